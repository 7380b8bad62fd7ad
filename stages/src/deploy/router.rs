//! A router stage's `[stage.router]` table (which experts it chooses among, how many, and by a
//! model or by rules) and a Mixture-of-Thoughts expert's `[stage.mot]` table; and the graph
//! checks that tie routers to the expert stages they name.

use super::fields::{bad, names, parse_table, FieldTy};
use super::{DeployError, DeployGraph, PayloadKind, Site, StageKind, StageSpec};
use crate::job::Modality;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The keys of a `[stage.router]` table and their types.
pub(super) const ROUTER_FIELDS: &[(&str, FieldTy)] = &[
    ("experts", FieldTy::CsvList),
    ("k", FieldTy::UInt),
    ("rules", FieldTy::StrList),
    ("default", FieldTy::Str),
];

/// The keys of a `[stage.mot]` table and their types.
pub(super) const MOT_FIELDS: &[(&str, FieldTy)] = &[("expert", FieldTy::Str)];

/// What a rule of a rule-form router matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleCondition {
    /// The request carries an image or audio part (`input:image`, `input:audio`).
    Input(Modality),
    /// The request asks for this output modality (`output:audio`, `output:image`, ...).
    Output(Modality),
    /// The request's `model` field is this name (`model:NAME`).
    Model(String),
}

/// One rule: when the condition holds, the request goes to `expert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    pub when: RuleCondition,
    pub expert: String,
}

impl RouteRule {
    /// The rule as written in the file (`input:image -> vision`).
    pub fn text(&self) -> String {
        let when = match &self.when {
            RuleCondition::Input(m) => format!("input:{m}"),
            RuleCondition::Output(m) => format!("output:{m}"),
            RuleCondition::Model(n) => format!("model:{n}"),
        };
        format!("{when} -> {}", self.expert)
    }
}

/// How a router decides.
#[derive(Debug, Clone, PartialEq)]
pub enum RouterForm {
    /// A sentence encoder plus an MLP scoring the experts, loaded from the stage's `model`.
    Model,
    /// No model: the first matching rule picks the primary, else `default`.
    Rules {
        rules: Vec<RouteRule>,
        default: String,
    },
}

/// A router stage's settings (`[stage.router]`; router stages only).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    /// The expert stage ids it chooses among, in the order of the model's scores.
    pub experts: Vec<String>,
    /// How many experts a request runs on (a request may ask for another count).
    pub k: usize,
    pub form: RouterForm,
}

/// A Mixture-of-Thoughts expert's settings (`[stage.mot]`; llm stages only): the stage's
/// `model` is the MoT checkpoint folder and `expert` names its expert in `mot_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct MotSettings {
    pub expert: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    experts: Option<Vec<String>>,
    k: Option<usize>,
    rules: Option<Vec<String>>,
    default: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMot {
    expert: Option<String>,
}

/// Parses a `[stage.router]` table. `has_model` says whether the stage names a `model`.
pub(super) fn parse_router(
    map: &Map<String, Value>,
    has_model: bool,
    file: &str,
    site: &Site,
) -> Result<RouterSettings, DeployError> {
    let r: RawRouter = parse_table(map, file, site, "router.", &names(ROUTER_FIELDS))?;
    let experts = r.experts.unwrap_or_default();
    if experts.is_empty() {
        return Err(bad(
            file,
            site,
            "router.experts",
            "list the expert stage ids the router chooses among",
        ));
    }
    if let Some(dup) = experts
        .iter()
        .enumerate()
        .find_map(|(i, e)| experts[..i].contains(e).then_some(e))
    {
        return Err(bad(
            file,
            site,
            "router.experts",
            &format!("`{dup}` is listed twice"),
        ));
    }
    let k = r.k.unwrap_or(1);
    if k == 0 || k > experts.len() {
        return Err(bad(
            file,
            site,
            "router.k",
            &format!(
                "must be between 1 and the number of experts ({})",
                experts.len()
            ),
        ));
    }
    let known = |e: &str, field: &str| {
        if experts.iter().any(|x| x == e) {
            Ok(())
        } else {
            Err(bad(
                file,
                site,
                field,
                &format!(
                    "`{e}` is not one of router.experts ({})",
                    experts.join(", ")
                ),
            ))
        }
    };
    let form =
        match (r.rules, r.default) {
            (None, None) if has_model => RouterForm::Model,
            (None, None) => {
                return Err(bad(
                    file,
                    site,
                    "router.rules",
                    "a router scores with a model (set the stage's `model`) or matches rules \
                 (`rules = [\"input:image -> vision\"]` and `default`); this one has neither",
                ))
            }
            (_, _) if has_model => return Err(bad(
                file,
                site,
                "router.rules",
                "a router with a `model` scores experts itself; remove `rules`/`default` or the \
                 stage's `model`",
            )),
            (rules, default) => {
                let default = default.ok_or_else(|| {
                    bad(
                        file,
                        site,
                        "router.default",
                        "a rule-form router needs `default`: the expert when no rule matches",
                    )
                })?;
                known(&default, "router.default")?;
                let mut parsed = Vec::new();
                for text in rules.unwrap_or_default() {
                    let rule = parse_rule(&text)
                        .map_err(|m| bad(file, site, "router.rules", &format!("`{text}`: {m}")))?;
                    known(&rule.expert, "router.rules")?;
                    parsed.push(rule);
                }
                RouterForm::Rules {
                    rules: parsed,
                    default,
                }
            }
        };
    Ok(RouterSettings { experts, k, form })
}

/// Parses `CONDITION -> EXPERT`.
fn parse_rule(text: &str) -> Result<RouteRule, String> {
    let (when, expert) = text
        .split_once("->")
        .ok_or("write a rule as `CONDITION -> EXPERT`")?;
    let (when, expert) = (when.trim(), expert.trim());
    if expert.is_empty() {
        return Err("no expert after `->`".into());
    }
    let modality = |m: &str| match m {
        "text" => Ok(Modality::Text),
        "image" => Ok(Modality::Image),
        "audio" => Ok(Modality::Audio),
        other => Err(format!("unknown modality `{other}` (text, image or audio)")),
    };
    let when = match when.split_once(':') {
        Some(("input", m)) => RuleCondition::Input(modality(m.trim())?),
        Some(("output", m)) => RuleCondition::Output(modality(m.trim())?),
        Some(("model", n)) if !n.trim().is_empty() => RuleCondition::Model(n.trim().to_string()),
        _ => {
            return Err(
                "the condition is `input:image|audio`, `output:text|image|audio` or `model:NAME`"
                    .into(),
            )
        }
    };
    Ok(RouteRule {
        when,
        expert: expert.to_string(),
    })
}

/// Parses a `[stage.mot]` table.
pub(super) fn parse_mot(
    map: &Map<String, Value>,
    file: &str,
    site: &Site,
) -> Result<MotSettings, DeployError> {
    let r: RawMot = parse_table(map, file, site, "mot.", &names(MOT_FIELDS))?;
    match r.expert {
        Some(e) if !e.trim().is_empty() => Ok(MotSettings { expert: e }),
        _ => Err(bad(
            file,
            site,
            "mot.expert",
            "name this stage's expert in the MoT checkpoint's mot_config.json",
        )),
    }
}

/// Checks every router against the graph: its experts are `llm` stages, each reached by a
/// `route` edge from it and no other stage; a router's `route` edges go only to its experts;
/// Mixture-of-Thoughts experts of one router share one checkpoint; and an output served by a
/// router (`text = "router"`: whichever expert is primary) is produced by every expert.
pub(super) fn check(g: &DeployGraph, file: &str) -> Result<(), DeployError> {
    let stage = |id: &str| g.stages.iter().find(|s| s.id == id);
    for r in g.stages.iter().filter(|s| s.kind == StageKind::Router) {
        let site = Site::Stage(r.id.clone());
        let Some(settings) = &r.router else {
            return Err(bad(
                file,
                &site,
                "router",
                "a router stage needs a [stage.router] table listing its experts",
            ));
        };
        let mut mot_root = None;
        for e in &settings.experts {
            let Some(spec) = stage(e) else {
                return Err(bad(
                    file,
                    &site,
                    "router.experts",
                    &format!("`{e}` is not a stage of this graph"),
                ));
            };
            if spec.kind != StageKind::Llm {
                return Err(bad(
                    file,
                    &site,
                    "router.experts",
                    &format!("`{e}` is a {} stage; experts are llm stages", spec.kind),
                ));
            }
            let edge = g
                .edges
                .iter()
                .any(|x| x.from == r.id && x.to == *e && x.carries == PayloadKind::Route);
            if !edge {
                return Err(bad(
                    file,
                    &site,
                    "router.experts",
                    &format!(
                        "expert `{e}` has no edge from the router: add [[edge]] from = \"{}\", \
                         to = \"{e}\", carries = \"route\"",
                        r.id
                    ),
                ));
            }
            if let Some(other) = g.edges.iter().find(|x| x.to == *e && x.from != r.id) {
                return Err(bad(
                    file,
                    &site,
                    "router.experts",
                    &format!(
                        "expert `{e}` also has an inbound edge from `{}`; an expert starts when its \
                         router selects it and reads the request itself, so its only inbound edge \
                         is the router's",
                        other.from
                    ),
                ));
            }
            if spec.mot.is_some() {
                match &mot_root {
                    None => mot_root = Some((e, &spec.model)),
                    Some((first, root)) if *root != &spec.model => {
                        return Err(bad(
                            file,
                            &site,
                            "router.experts",
                            &format!(
                                "Mixture-of-Thoughts experts of one router share a checkpoint: \
                                 `{first}` uses {} and `{e}` uses {}",
                                root.display(),
                                spec.model.display()
                            ),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        let mot = settings
            .experts
            .iter()
            .filter(|e| stage(e).is_some_and(|s| s.mot.is_some()))
            .count();
        if mot != 0 && mot != settings.experts.len() {
            return Err(bad(
                file,
                &site,
                "router.experts",
                "either every expert of a router is a Mixture-of-Thoughts expert ([stage.mot]) \
                 or none is",
            ));
        }
        let serves_output = g.outputs.iter().any(|(_, id)| *id == r.id);
        if mot == 0 && settings.k > 1 && serves_output {
            return Err(bad(
                file,
                &site,
                "router.k",
                "the router serves an output, which its primary expert answers alone unless the \
                 experts are Mixture-of-Thoughts experts ([stage.mot]) that collaborate: k must \
                 be 1 (or join the experts' outputs in a downstream stage)",
            ));
        }
        for x in g.edges.iter().filter(|x| x.from == r.id) {
            if !settings.experts.contains(&x.to) {
                return Err(bad(
                    file,
                    &site,
                    "router.experts",
                    &format!(
                        "the router has an edge to `{}`, which is not one of its experts",
                        x.to
                    ),
                ));
            }
        }
        for (m, _) in g.outputs.iter().filter(|(_, id)| *id == r.id) {
            let needs = super::modality_payload(*m);
            if let Some(e) = settings
                .experts
                .iter()
                .find(|e| stage(e).is_some_and(|s| !s.outputs.contains(&needs)))
            {
                return Err(bad(
                    file,
                    &Site::Outputs,
                    m.as_str(),
                    &format!(
                        "`{}` is a router: its primary expert answers, and expert `{e}` does not \
                         produce `{needs}`",
                        r.id
                    ),
                ));
            }
        }
    }
    for s in g.stages.iter().filter(|s| s.mot.is_some()) {
        let routed = g.stages.iter().any(|r| {
            r.router
                .as_ref()
                .is_some_and(|settings| settings.experts.contains(&s.id))
        });
        if !routed {
            return Err(bad(
                file,
                &Site::Stage(s.id.clone()),
                "mot",
                "a Mixture-of-Thoughts expert runs where a router selects it: list it in a \
                 router's [stage.router] experts",
            ));
        }
    }
    Ok(())
}

/// The experts a stage's router output stands for (empty for stages that are not routers).
pub fn router_experts(spec: &StageSpec) -> &[String] {
    spec.router.as_ref().map_or(&[], |r| r.experts.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_name_their_mistakes() {
        let r = parse_rule("input:image -> vision").unwrap();
        assert_eq!(r.when, RuleCondition::Input(Modality::Image));
        assert_eq!(r.text(), "input:image -> vision");
        assert_eq!(
            parse_rule(" model: coder->code").unwrap().when,
            RuleCondition::Model("coder".into())
        );
        assert!(parse_rule("input:video -> x")
            .unwrap_err()
            .contains("video"));
        assert!(parse_rule("input:image").unwrap_err().contains("->"));
        assert!(parse_rule("size:big -> x")
            .unwrap_err()
            .contains("condition"));
    }
}
