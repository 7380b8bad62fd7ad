//! The `omnistage` binary's `check` and `make-tiny` subcommands.

use std::process::Command;

fn omnistage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_omnistage"))
}

#[test]
fn check_prints_text_and_dot_for_a_valid_graph() {
    let dir = tempfile::tempdir().unwrap();
    let out = omnistage()
        .args(["make-tiny", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = dir.path().join("graph.toml");
    std::fs::write(
        &toml,
        "name = \"g\"\n[[stage]]\nid = \"thinker\"\nkind = \"llm\"\nmodel = \"tiny-omni/thinker\"\n[outputs]\ntext = \"thinker\"\n",
    )
    .unwrap();
    let out = omnistage().arg("check").arg(&toml).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("thinker"));
    assert!(stdout.contains("digraph"));
}

#[test]
fn check_names_file_stage_and_field_of_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("broken.toml");
    std::fs::write(
        &toml,
        "name = \"g\"\n[[stage]]\nid = \"thinker\"\nkind = \"llm\"\nmodel = \"nowhere\"\ndevice = \"gpu\"\n[outputs]\ntext = \"thinker\"\n",
    )
    .unwrap();
    let out = omnistage().arg("check").arg(&toml).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.toml") && stderr.contains("thinker") && stderr.contains("device"),
        "{stderr}"
    );
    // A valid structure whose model directory is missing fails on `model`.
    std::fs::write(&toml, "name = \"g\"\n[[stage]]\nid = \"thinker\"\nkind = \"llm\"\nmodel = \"nowhere\"\n[outputs]\ntext = \"thinker\"\n").unwrap();
    let out = omnistage().arg("check").arg(&toml).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("model") && stderr.contains("nowhere"),
        "{stderr}"
    );
}

#[test]
fn make_tiny_is_byte_identical_for_a_seed() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [&a, &b] {
        let out = omnistage()
            .args(["make-tiny", "--seed", "7", "--out"])
            .arg(d.path())
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let pa = std::fs::read(a.path().join("tiny-omni/thinker").join(name)).unwrap();
        let pb = std::fs::read(b.path().join("tiny-omni/thinker").join(name)).unwrap();
        assert_eq!(pa, pb, "{name} differs");
    }
}
