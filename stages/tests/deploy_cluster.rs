//! `[cluster]` and `remote = true` in the deployment file: discovery settings, the secret, and
//! errors that name the field.

use omnistage_stages::deploy::{ClusterSettings, DeployGraph, SecretError};
use std::path::Path;
use std::time::Duration;

fn graph(stage_extra: &str, cluster: &str) -> String {
    format!(
        r#"
name = "demo"
[[stage]]
id = "thinker"
kind = "llm"
model = "m/thinker"
{stage_extra}

[outputs]
text = "thinker"
{cluster}
"#
    )
}

fn load(text: &str) -> Result<DeployGraph, String> {
    DeployGraph::from_toml_str(text, Path::new("d.toml"), Path::new("/srv"), &[])
        .map_err(|e| e.to_string())
}

#[test]
fn a_remote_stage_with_a_cluster_loads_with_defaults() {
    let g = load(&graph(
        "remote = true",
        "[cluster]\netcd = [\"http://10.0.0.2:2379\", \"https://etcd:2379\"]\nsecret_file = \"s.key\"",
    ))
    .unwrap();
    assert!(g.stages[0].remote && !g.stages[0].process);
    let c = g.cluster.as_ref().unwrap();
    assert_eq!(c.etcd.len(), 2);
    assert_eq!(c.prefix, "/omnistage/demo");
    assert_eq!(c.secret_file.as_deref(), Some(Path::new("/srv/s.key")));
    assert_eq!(c.lease_ttl, Duration::from_secs(5));
    let shown = g.to_text();
    assert!(shown.contains("remote workers (etcd)"), "{shown}");
    assert!(
        shown.contains("cluster: etcd http://10.0.0.2:2379"),
        "{shown}"
    );
}

#[test]
fn bad_cluster_settings_name_the_field() {
    let cases = [
        ("remote = true", "", "remote", "[cluster]"),
        ("remote = true\nprocess = true", "", "remote", "not both"),
        ("", "[cluster]\netcd = []", "cluster.etcd", "at least one"),
        (
            "",
            "[cluster]\netcd = [\"etcd:2379\"]",
            "cluster.etcd",
            "not an endpoint",
        ),
        (
            "",
            "[cluster]\netcd = [\"http://e:1\"]\nprefix = \"x/\"",
            "cluster.prefix",
            "start with",
        ),
        (
            "",
            "[cluster]\netcd = [\"http://e:1\"]\nlease_ttl_s = 0",
            "cluster.lease_ttl_s",
            "1 to 3600",
        ),
        (
            "",
            "[cluster]\netcd = [\"http://e:1\"]\nsecret = \"x\"",
            "secret",
            "unknown",
        ),
    ];
    for (stage, cluster, field, words) in cases {
        let err = load(&graph(stage, cluster)).unwrap_err();
        assert!(err.contains("d.toml"), "{err}");
        assert!(err.contains(field), "{field}: {err}");
        assert!(err.contains(words), "{words}: {err}");
    }
}

#[test]
fn the_secret_comes_from_its_file_and_must_be_long_enough() {
    let dir = std::env::temp_dir().join(format!("omnistage-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.key");
    let settings = |p: &Path| ClusterSettings {
        etcd: vec!["http://e:1".into()],
        prefix: "/p".into(),
        secret_file: Some(p.to_path_buf()),
        lease_ttl: Duration::from_secs(5),
    };
    std::fs::write(&path, "  0123456789abcdef-long-enough\n").unwrap();
    assert_eq!(
        settings(&path).secret().unwrap(),
        b"0123456789abcdef-long-enough"
    );
    std::fs::write(&path, "short\n").unwrap();
    assert!(matches!(
        settings(&path).secret(),
        Err(SecretError::TooShort { .. })
    ));
    let missing = dir.join("none");
    let err = settings(&missing).secret().unwrap_err();
    assert!(err.to_string().contains("none"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tcp_edge_needs_a_remote_end() {
    let two = |remote: &str| {
        format!(
            r#"
[[stage]]
id = "thinker"
kind = "llm"
model = "m/thinker"
outputs = ["text", "hidden"]

[[stage]]
id = "helper"
kind = "llm"
model = "m/helper"
{remote}

[[edge]]
from = "thinker"
to = "helper"
carries = "hidden"
connector = "tcp"

[outputs]
text = "helper"

[cluster]
etcd = ["http://e:2379"]
"#
        )
    };
    let err = load(&two("")).unwrap_err();
    assert!(
        err.contains("connector") && err.contains("remote = true"),
        "{err}"
    );
    let g = load(&two("remote = true")).unwrap();
    assert!(g.stages[1].remote);
}
