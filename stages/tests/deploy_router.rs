//! Router stages in the deployment file: `[stage.router]` (model and rule forms), `[stage.mot]`
//! experts, the graph checks that tie a router to the experts it names, and errors that name the
//! field.

use omnistage_stages::deploy::{DeployGraph, RouterForm, RuleCondition, StageKind};
use omnistage_stages::Modality;
use std::path::Path;

fn load(text: &str) -> Result<DeployGraph, String> {
    DeployGraph::from_toml_str(text, Path::new("r.toml"), Path::new("/srv"), &[])
        .map_err(|e| e.to_string())
}

fn expert(id: &str, extra: &str) -> String {
    format!("[[stage]]\nid = \"{id}\"\nkind = \"llm\"\nmodel = \"m/{id}\"\n{extra}\n")
}

fn route(from: &str, to: &str) -> String {
    format!("[[edge]]\nfrom = \"{from}\"\nto = \"{to}\"\ncarries = \"route\"\n")
}

/// A rule router over `a` and `b` serving text, with `router` the [stage.router] body.
fn rule_graph(router: &str) -> String {
    format!(
        "name = \"r\"\n[[stage]]\nid = \"router\"\nkind = \"router\"\n[stage.router]\n{router}\n{}{}{}{}[outputs]\ntext = \"router\"\n",
        expert("a", ""),
        expert("b", ""),
        route("router", "a"),
        route("router", "b"),
    )
}

#[test]
fn the_tiny_mot_deployment_loads_and_shows_its_routing() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tiny-mot.toml");
    let g = DeployGraph::load(&path).unwrap();
    let router = g.stage("router").unwrap();
    assert_eq!(router.kind, StageKind::Router);
    let settings = router.router.as_ref().unwrap();
    assert_eq!(settings.experts, ["small", "medium", "large"]);
    assert_eq!((settings.k, &settings.form), (2, &RouterForm::Model));
    for e in &settings.experts {
        let s = g.stage(e).unwrap();
        assert_eq!(s.mot.as_ref().unwrap().expert, *e);
        assert!(s.model.ends_with("tiny-mot"));
    }
    let text = g.to_text();
    assert!(
        text.contains("routes:   top-2 of [small, medium, large], scored by the model"),
        "{text}"
    );
    assert!(
        text.contains("text <- the primary expert `router` selects (small | medium | large)"),
        "{text}"
    );
    assert!(text.contains("mot:      expert `large`"), "{text}");
}

#[test]
fn a_rule_router_needs_no_model_and_keeps_its_rules_in_order() {
    let g = load(&rule_graph(
        "experts = [\"a\", \"b\"]\nrules = [\"input:image -> b\", \"model:fast -> a\", \"output:audio -> b\"]\ndefault = \"a\"",
    ))
    .unwrap();
    let r = g.stage("router").unwrap();
    assert_eq!(r.model, Path::new(""));
    let RouterForm::Rules { rules, default } = &r.router.as_ref().unwrap().form else {
        panic!("rule form expected");
    };
    assert_eq!(default, "a");
    let whens: Vec<_> = rules.iter().map(|r| r.when.clone()).collect();
    assert_eq!(
        whens,
        [
            RuleCondition::Input(Modality::Image),
            RuleCondition::Model("fast".into()),
            RuleCondition::Output(Modality::Audio)
        ]
    );
    assert!(g
        .to_text()
        .contains("rules [input:image -> b; model:fast -> a; output:audio -> b], default a"));
}

#[test]
fn router_mistakes_name_the_stage_and_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            rule_graph("experts = []\ndefault = \"a\""),
            "router.experts",
        ),
        (
            rule_graph("experts = [\"a\", \"a\"]\ndefault = \"a\""),
            "listed twice",
        ),
        (
            rule_graph("experts = [\"a\", \"b\"]\nk = 3\ndefault = \"a\""),
            "router.k",
        ),
        (
            rule_graph("experts = [\"a\", \"b\"]\nk = 0\ndefault = \"a\""),
            "router.k",
        ),
        (
            rule_graph("experts = [\"a\", \"b\"]\nrules = [\"input:image -> b\"]"),
            "router.default",
        ),
        (
            rule_graph("experts = [\"a\", \"b\"]\ndefault = \"c\""),
            "not one of router.experts",
        ),
        (
            rule_graph("experts = [\"a\", \"b\"]\nrules = [\"input:video -> b\"]\ndefault = \"a\""),
            "video",
        ),
        (
            rule_graph("experts = [\"a\", \"b\"]\nrules = [\"input:image => b\"]\ndefault = \"a\""),
            "->",
        ),
        // No model and no rules: the model is what is missing.
        (
            rule_graph("experts = [\"a\", \"b\"]"),
            "field `model`: required",
        ),
        (
            rule_graph("experts = [\"a\", \"x\"]\ndefault = \"a\""),
            "`x` is not a stage",
        ),
        (
            rule_graph("experts = [\"a\", \"b\"]\nk = 2\ndefault = \"a\""),
            "k must be 1",
        ),
        (
            rule_graph("experts = [\"a\", \"b\"]\nbogus = 1\ndefault = \"a\""),
            "router.bogus",
        ),
        // An expert without the router's edge.
        (
            rule_graph("experts = [\"a\", \"b\"]\ndefault = \"a\"")
                .replace(&route("router", "b"), ""),
            "has no edge from the router",
        ),
    ];
    for (text, needle) in cases {
        let err = load(&text).expect_err(needle);
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(err.contains("r.toml"), "names the file: {err}");
    }
}

#[test]
fn mot_tables_and_kinds_are_checked() {
    // [stage.mot] on a router, [stage.router] on an llm stage.
    let on_router = rule_graph("experts = [\"a\", \"b\"]\ndefault = \"a\"").replace(
        "kind = \"router\"\n",
        "kind = \"router\"\n[stage.mot]\nexpert = \"a\"\n",
    );
    assert!(load(&on_router).unwrap_err().contains("mot"));
    let on_llm = rule_graph("experts = [\"a\", \"b\"]\ndefault = \"a\"").replace(
        "model = \"m/a\"\n",
        "model = \"m/a\"\n[stage.router]\nexperts = [\"b\"]\n",
    );
    assert!(load(&on_llm).unwrap_err().contains("only router stages"));
    // Some experts MoT and some not.
    let mixed = rule_graph("experts = [\"a\", \"b\"]\ndefault = \"a\"").replace(
        "model = \"m/a\"\n",
        "model = \"m/a\"\n[stage.mot]\nexpert = \"a\"\n",
    );
    assert!(load(&mixed).unwrap_err().contains("either every expert"));
    // MoT experts of two checkpoints.
    let split = rule_graph("experts = [\"a\", \"b\"]\ndefault = \"a\"")
        .replace(
            "model = \"m/a\"\n",
            "model = \"m/a\"\n[stage.mot]\nexpert = \"a\"\n",
        )
        .replace(
            "model = \"m/b\"\n",
            "model = \"m/b\"\n[stage.mot]\nexpert = \"b\"\n",
        );
    assert!(load(&split).unwrap_err().contains("share a checkpoint"));
    // A MoT expert nobody routes to.
    let lone = format!(
        "name = \"r\"\n{}[outputs]\ntext = \"a\"\n",
        expert("a", "[stage.mot]\nexpert = \"a\"")
    );
    assert!(load(&lone).unwrap_err().contains("list it in a router"));
    // An expert with another inbound edge.
    let fed = format!(
        "{}{}",
        rule_graph("experts = [\"a\", \"b\"]\ndefault = \"a\""),
        "[[edge]]\nfrom = \"a\"\nto = \"b\"\ncarries = \"text\"\n"
    );
    assert!(load(&fed).unwrap_err().contains("only inbound edge"));
}

#[test]
fn independent_experts_may_fan_in_to_a_downstream_stage() {
    // k = 2 of independent experts is fine when a downstream stage joins their text.
    let text = format!(
        "name = \"fan\"\n[[stage]]\nid = \"router\"\nkind = \"router\"\n[stage.router]\nexperts = [\"a\", \"b\"]\nk = 2\nrules = []\ndefault = \"a\"\n{}{}{}{}{}\
         [[edge]]\nfrom = \"a\"\nto = \"join\"\ncarries = \"text\"\n[[edge]]\nfrom = \"b\"\nto = \"join\"\ncarries = \"text\"\n[outputs]\ntext = \"join\"\n",
        expert("a", ""),
        expert("b", ""),
        expert("join", ""),
        route("router", "a"),
        route("router", "b"),
    );
    let g = load(&text).unwrap();
    assert_eq!(g.stage("router").unwrap().router.as_ref().unwrap().k, 2);
}
