//! The Kubernetes manifests under `deploy/k8s/` (no cluster here: this is all that checks them).
//!
//! Every YAML document is parsed and cross-checked against the deployment graph in the
//! `omnistage-deploy` ConfigMap: one worker Deployment per `remote = true` stage running
//! `omnistage worker --stage <id>` with the ConfigMap mounted, a GPU limit exactly where the stage's
//! device is `cuda:N`, `/health` probes and Prometheus annotations on declared ports, the cluster
//! secret from the `omnistage-cluster` Secret, Services that select their pods, and a
//! kustomization that lists every file. Failures name the file and the object.

use omnistage_stages::deploy::DeployGraph;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the ConfigMap is mounted and the deployment file every pod reads.
const DEPLOY_DIR: &str = "/etc/omnistage";
const DEPLOY_FILE: &str = "/etc/omnistage/deploy.toml";
const CONFIGMAP: &str = "omnistage-deploy";
const NAMESPACE: &str = "omnistage";
const SECRET_NAME: &str = "omnistage-cluster";
const SECRET_KEY: &str = "secret";
const SECRET_ENV: &str = "OMNISTAGE_CLUSTER_SECRET";
const GPU: &str = "nvidia.com/gpu";
const GATEWAY_PORT: u64 = 8000;

/// One YAML document of one manifest file.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        str_at(&self.value, "/kind").unwrap_or("?")
    }

    fn name(&self) -> &str {
        str_at(&self.value, "/metadata/name").unwrap_or("?")
    }

    /// `file: Kind/name`, for failure messages.
    fn at(&self) -> String {
        format!("{}: {}/{}", self.file, self.kind(), self.name())
    }

    fn is(&self, kind: &str, name: &str) -> bool {
        self.kind() == kind && self.name() == name
    }

    /// Deployments and StatefulSets: objects with a pod template.
    fn is_workload(&self) -> bool {
        matches!(self.kind(), "Deployment" | "StatefulSet")
    }

    fn pod_spec(&self) -> &Value {
        self.value
            .pointer("/spec/template/spec")
            .unwrap_or(&Value::Null)
    }

    fn containers(&self) -> Vec<&Value> {
        list(self.pod_spec(), "/containers")
    }

    fn template_labels(&self) -> Vec<(String, String)> {
        string_map(&self.value, "/spec/template/metadata/labels")
    }
}

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// The manifest files (every `*.yaml`/`*.yml` in `deploy/k8s/`), sorted.
fn manifest_files() -> Vec<String> {
    let dir = k8s_dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// Every non-empty document of every manifest file.
fn docs() -> Vec<Doc> {
    let mut out = Vec::new();
    for file in manifest_files() {
        let path = k8s_dir().join(&file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("deploy/k8s/{file}: document {}: {e}", i + 1));
            if !value.is_null() {
                out.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    out
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn list<'a>(v: &'a Value, pointer: &str) -> Vec<&'a Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn string_map(v: &Value, pointer: &str) -> Vec<(String, String)> {
    v.pointer(pointer)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().unwrap_or("<not a string>").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Panics listing every problem found, if any.
fn report(what: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// A container's `command` followed by its `args` (strings only).
fn argv(c: &Value) -> Vec<&str> {
    list(c, "/command")
        .into_iter()
        .chain(list(c, "/args"))
        .filter_map(Value::as_str)
        .collect()
}

/// The omnistage subcommand a container runs: the first word after the `omnistage` binary (or the
/// first word when the image's entrypoint is left to supply it).
fn subcommand<'a>(argv: &[&'a str]) -> Option<&'a str> {
    argv.iter()
        .copied()
        .find(|w| !(*w == "omnistage" || w.ends_with("/omnistage")))
}

/// The value of `--name value` or `--name=value` in `argv`.
fn flag<'a>(argv: &[&'a str], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    argv.iter().enumerate().find_map(|(i, w)| {
        if *w == name {
            argv.get(i + 1).copied()
        } else {
            w.strip_prefix(eq.as_str())
        }
    })
}

/// The port of a `host:port` address.
fn addr_port(addr: &str) -> Option<u64> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// `(name, containerPort)` of each port a container declares.
fn declared_ports(c: &Value) -> Vec<(Option<String>, u64)> {
    list(c, "/ports")
        .into_iter()
        .filter_map(|p| {
            let port = p.get("containerPort")?.as_u64()?;
            Some((
                p.get("name").and_then(Value::as_str).map(String::from),
                port,
            ))
        })
        .collect()
}

/// Resolves a probe's or Service's port (a number, or a container port's name) against the
/// container's declared ports; `None` when it names or numbers no declared port.
fn resolve_port(c: &Value, port: &Value) -> Option<u64> {
    let ports = declared_ports(c);
    match port {
        Value::Number(n) => n.as_u64().filter(|n| ports.iter().any(|(_, p)| p == n)),
        Value::String(name) => ports
            .iter()
            .find(|(n, _)| n.as_deref() == Some(name.as_str()))
            .map(|(_, p)| *p),
        _ => None,
    }
}

/// The pod volume mounted at `mount_path` in container `c`.
fn volume_at<'a>(doc: &'a Doc, c: &Value, mount_path: &str) -> Option<&'a Value> {
    let mount = list(c, "/volumeMounts")
        .into_iter()
        .find(|m| str_at(m, "/mountPath") == Some(mount_path))?;
    let name = str_at(mount, "/name")?;
    list(doc.pod_spec(), "/volumes")
        .into_iter()
        .find(|v| str_at(v, "/name") == Some(name))
}

/// Whether the container mounts the ConfigMap at `/etc/omnistage`.
fn mounts_deploy_config(doc: &Doc, c: &Value) -> bool {
    volume_at(doc, c, DEPLOY_DIR).is_some_and(|v| str_at(v, "/configMap/name") == Some(CONFIGMAP))
}

/// `labels ⊇ wanted` (both non-empty `wanted` and every pair present).
fn selects(wanted: &[(String, String)], labels: &[(String, String)]) -> bool {
    !wanted.is_empty() && wanted.iter().all(|w| labels.contains(w))
}

/// The deployment graph held by the `omnistage-deploy` ConfigMap, and its TOML text.
fn graph(docs: &[Doc]) -> (DeployGraph, String) {
    let cm = docs
        .iter()
        .find(|d| d.is("ConfigMap", CONFIGMAP))
        .unwrap_or_else(|| panic!("no ConfigMap {CONFIGMAP} in deploy/k8s/"));
    let text = str_at(&cm.value, "/data/deploy.toml")
        .unwrap_or_else(|| panic!("{}: no data key deploy.toml", cm.at()))
        .to_string();
    let g = DeployGraph::from_toml_str(&text, Path::new("deploy.toml"), Path::new(DEPLOY_DIR), &[])
        .unwrap_or_else(|e| panic!("{}: deploy.toml does not load: {e}", cm.at()));
    (g, text)
}

/// The worker Deployments' main containers, each with the stage it runs.
fn workers(docs: &[Doc]) -> Vec<(&Doc, &Value, String)> {
    let mut out = Vec::new();
    for d in docs.iter().filter(|d| d.kind() == "Deployment") {
        for c in d.containers() {
            let a = argv(c);
            if subcommand(&a) == Some("worker") {
                let stage = flag(&a, "--stage").unwrap_or("<no --stage>").to_string();
                out.push((d, c, stage));
            }
        }
    }
    out
}

#[test]
fn every_document_has_api_version_kind_and_name() {
    let docs = docs();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for d in &docs {
        for field in ["/apiVersion", "/kind", "/metadata/name"] {
            if str_at(&d.value, field).is_none_or(str::is_empty) {
                problems.push(format!("{}: no {}", d.at(), &field[1..]));
            }
        }
        if !seen.insert((d.kind().to_string(), d.name().to_string())) {
            problems.push(format!("{}: defined twice", d.at()));
        }
        // Namespaced objects live in the omnistage namespace (or leave it to kustomize).
        let cluster_scoped = matches!(d.kind(), "Namespace" | "Kustomization");
        if let Some(ns) = str_at(&d.value, "/metadata/namespace") {
            if cluster_scoped || ns != NAMESPACE {
                problems.push(format!("{}: namespace `{ns}`, want {NAMESPACE}", d.at()));
            }
        }
        // No cluster secret in the repository: it is made with kubectl (README.md).
        if d.kind() == "Secret" {
            problems.push(format!(
                "{}: secrets are not committed; README.md tells how to create it",
                d.at()
            ));
        }
    }
    if !docs.iter().any(|d| d.is("Namespace", NAMESPACE)) {
        problems.push(format!("no Namespace {NAMESPACE}"));
    }
    report("manifests", problems);
}

#[test]
fn the_kustomization_lists_every_manifest_file() {
    let docs = docs();
    let k = docs
        .iter()
        .find(|d| d.kind() == "Kustomization")
        .expect("no Kustomization in deploy/k8s/");
    assert_eq!(k.file, "kustomization.yaml", "{}: wrong file name", k.at());
    assert_eq!(
        str_at(&k.value, "/namespace"),
        Some(NAMESPACE),
        "{}: namespace",
        k.at()
    );
    let listed: Vec<&str> = list(&k.value, "/resources")
        .into_iter()
        .filter_map(Value::as_str)
        .collect();
    let listed_set: BTreeSet<&str> = listed.iter().copied().collect();
    let files: BTreeSet<String> = manifest_files()
        .into_iter()
        .filter(|f| f != "kustomization.yaml")
        .collect();
    let mut problems = Vec::new();
    if listed_set.len() != listed.len() {
        problems.push(format!(
            "{}: a resource is listed twice: {listed:?}",
            k.at()
        ));
    }
    for f in &files {
        if !listed_set.contains(f.as_str()) {
            problems.push(format!("{}: does not list deploy/k8s/{f}", k.at()));
        }
    }
    for l in &listed_set {
        if !files.contains(*l) {
            problems.push(format!(
                "{}: lists {l}, which is not a manifest in deploy/k8s/",
                k.at()
            ));
        }
    }
    report("kustomization.yaml", problems);
}

#[test]
fn the_configmap_graph_loads_and_its_cluster_names_the_etcd_service() {
    let docs = docs();
    let (g, _) = graph(&docs);
    let cluster = g
        .cluster
        .as_ref()
        .expect("configmap.yaml: deploy.toml has no [cluster] table");
    assert!(
        cluster.secret_file.is_none(),
        "configmap.yaml: [cluster] secret_file is set; the pods take the secret from {SECRET_ENV}"
    );
    assert!(
        !cluster.etcd.is_empty(),
        "configmap.yaml: [cluster] etcd is empty"
    );
    for url in &cluster.etcd {
        let hostport = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or(url);
        let (host, port) = hostport
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("configmap.yaml: etcd endpoint {url} has no port"));
        let port: u64 = port
            .parse()
            .unwrap_or_else(|_| panic!("configmap.yaml: etcd endpoint {url}: bad port"));
        // `etcd`, `etcd.omnistage`, `etcd.omnistage.svc.cluster.local`: the Service's name first.
        let mut labels = host.split('.');
        let svc_name = labels.next().unwrap_or_default();
        if let Some(ns) = labels.next() {
            assert_eq!(
                ns, NAMESPACE,
                "configmap.yaml: etcd endpoint {url}: namespace"
            );
        }
        let svc = docs
            .iter()
            .find(|d| d.is("Service", svc_name))
            .unwrap_or_else(|| {
                panic!("configmap.yaml: etcd endpoint {url} names Service {svc_name}, which no manifest defines")
            });
        assert!(
            list(&svc.value, "/spec/ports")
                .iter()
                .any(|p| p.get("port").and_then(Value::as_u64) == Some(port)),
            "{}: has no port {port}, which the etcd endpoint {url} uses",
            svc.at()
        );
    }
    for s in &g.stages {
        assert!(
            s.model.starts_with("/models"),
            "configmap.yaml: stage {}: model {} is not under /models",
            s.id,
            s.model.display()
        );
    }
    assert!(
        g.stages.iter().any(|s| s.remote),
        "configmap.yaml: no stage is `remote = true`"
    );
}

/// The ConfigMap's model paths are where `omnistage make-tiny --out /models` (the pods'
/// initContainers) writes the checkpoints.
#[test]
fn the_configmap_model_paths_match_make_tiny() {
    let docs = docs();
    let (_, text) = graph(&docs);
    let dir = tempfile::tempdir().unwrap();
    omnistage_engines::tiny::make_tiny(dir.path(), 0).expect("make-tiny");
    let root = format!("{}/", dir.path().display());
    let moved = text.replace("\"/models/", &format!("\"{root}"));
    let g = DeployGraph::from_toml_str(&moved, Path::new("deploy.toml"), dir.path(), &[])
        .expect("configmap.yaml: deploy.toml with /models moved");
    if let Err(e) = g.check_models() {
        panic!("configmap.yaml: a model path is not where make-tiny writes it: {e}");
    }
    // Every pod that reads /models fills it with make-tiny (demo) in an initContainer.
    let mut problems = Vec::new();
    for d in docs.iter().filter(|d| d.is_workload()) {
        let reads_models = d
            .containers()
            .iter()
            .any(|c| volume_at(d, c, "/models").is_some());
        if !reads_models {
            continue;
        }
        let fills = list(d.pod_spec(), "/initContainers").into_iter().any(|c| {
            let a = argv(c);
            subcommand(&a) == Some("make-tiny")
                && flag(&a, "--out") == Some("/models")
                && volume_at(d, c, "/models").is_some()
        });
        if !fills {
            problems.push(format!(
                "{}: mounts /models but no initContainer runs `make-tiny --out /models` with it mounted",
                d.at()
            ));
        }
    }
    report("model volumes", problems);
}

#[test]
fn every_remote_stage_has_exactly_one_worker_deployment() {
    let docs = docs();
    let (g, _) = graph(&docs);
    let workers = workers(&docs);
    let mut problems = Vec::new();
    for s in g.stages.iter().filter(|s| s.remote) {
        let mine: Vec<_> = workers.iter().filter(|(_, _, id)| *id == s.id).collect();
        let [(d, c, _)] = mine.as_slice() else {
            let names: Vec<String> = mine.iter().map(|(d, _, _)| d.at()).collect();
            problems.push(format!(
                "stage {}: want exactly one Deployment running `omnistage worker --stage {}`, found {}: {names:?}",
                s.id,
                s.id,
                mine.len()
            ));
            continue;
        };
        let a = argv(c);
        if flag(&a, "--deploy") != Some(DEPLOY_FILE) {
            problems.push(format!(
                "{}: worker for stage {} has no `--deploy {DEPLOY_FILE}`",
                d.at(),
                s.id
            ));
        }
        if !mounts_deploy_config(d, c) {
            problems.push(format!(
                "{}: does not mount ConfigMap {CONFIGMAP} at {DEPLOY_DIR}",
                d.at()
            ));
        }
        let model_dir = s.model.to_string_lossy();
        let mounts_model = list(c, "/volumeMounts")
            .iter()
            .filter_map(|m| str_at(m, "/mountPath"))
            .any(|p| s.model.starts_with(p));
        if !mounts_model {
            problems.push(format!(
                "{}: mounts nothing holding the stage's model {model_dir}",
                d.at()
            ));
        }
        for f in ["--listen", "--advertise", "--http"] {
            match flag(&a, f).and_then(addr_port) {
                Some(p) if declared_ports(c).iter().any(|(_, q)| *q == p) => {}
                Some(p) => problems.push(format!(
                    "{}: {f} port {p} is not a declared containerPort",
                    d.at()
                )),
                None => problems.push(format!("{}: no `{f} host:port`", d.at())),
            }
        }
        if flag(&a, "--instance").is_none() {
            problems.push(format!("{}: no --instance", d.at()));
        }
        let wants_gpu = s.device.to_string().starts_with("cuda");
        let has_gpu = c
            .pointer("/resources/limits")
            .and_then(|l| l.get(GPU))
            .is_some();
        if wants_gpu != has_gpu {
            problems.push(format!(
                "{}: stage {} runs on {} but the {GPU} limit is {}",
                d.at(),
                s.id,
                s.device,
                if has_gpu { "set" } else { "missing" }
            ));
        }
    }
    // No worker Deployment for a stage that is not remote in the graph.
    for (d, _, id) in &workers {
        if !g.stages.iter().any(|s| s.remote && s.id == *id) {
            problems.push(format!(
                "{}: runs a worker for `{id}`, which is no remote stage of the graph",
                d.at()
            ));
        }
    }
    report("stage workers", problems);
}

#[test]
fn every_deployment_has_probes_metrics_annotations_and_the_secret() {
    let docs = docs();
    let mut problems = Vec::new();
    let deployments: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Deployment").collect();
    assert!(!deployments.is_empty(), "no Deployments in deploy/k8s/");
    for d in deployments {
        let at = d.at();
        let containers = d.containers();
        if containers.is_empty() {
            problems.push(format!("{at}: no containers"));
        }
        for c in &containers {
            let cname = str_at(c, "/name").unwrap_or("?");
            for probe in ["livenessProbe", "readinessProbe"] {
                let Some(get) = c.get(probe).and_then(|p| p.get("httpGet")) else {
                    problems.push(format!("{at}: container {cname}: no {probe}.httpGet"));
                    continue;
                };
                if str_at(get, "/path") != Some("/health") {
                    problems.push(format!(
                        "{at}: container {cname}: {probe} path is not /health"
                    ));
                }
                if resolve_port(c, get.get("port").unwrap_or(&Value::Null)).is_none() {
                    problems.push(format!(
                        "{at}: container {cname}: {probe} port is not a declared containerPort"
                    ));
                }
            }
            let a = argv(c);
            if matches!(subcommand(&a), Some("serve" | "worker")) {
                let secret = list(c, "/env")
                    .into_iter()
                    .find(|e| str_at(e, "/name") == Some(SECRET_ENV));
                let ok = secret.is_some_and(|e| {
                    e.get("value").is_none()
                        && str_at(e, "/valueFrom/secretKeyRef/name") == Some(SECRET_NAME)
                        && str_at(e, "/valueFrom/secretKeyRef/key") == Some(SECRET_KEY)
                });
                if !ok {
                    problems.push(format!(
                        "{at}: container {cname}: no {SECRET_ENV} from secretKeyRef {SECRET_NAME}/{SECRET_KEY}"
                    ));
                }
            }
        }
        let ann = string_map(&d.value, "/spec/template/metadata/annotations");
        let get = |k: &str| ann.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if get("prometheus.io/scrape") != Some("true") {
            problems.push(format!(
                "{at}: pod template has no prometheus.io/scrape: \"true\""
            ));
        }
        if get("prometheus.io/path").is_some_and(|p| p != "/metrics") {
            problems.push(format!("{at}: prometheus.io/path is not /metrics"));
        }
        match get("prometheus.io/port").map(str::parse::<u64>) {
            Some(Ok(p))
                if containers
                    .iter()
                    .any(|c| declared_ports(c).iter().any(|(_, q)| *q == p)) => {}
            Some(Ok(p)) => problems.push(format!(
                "{at}: prometheus.io/port {p} is not a declared containerPort"
            )),
            _ => problems.push(format!("{at}: no numeric prometheus.io/port annotation")),
        }
    }
    report("Deployments", problems);
}

#[test]
fn the_gateway_serves_the_configmap_graph_on_port_8000() {
    let docs = docs();
    let gateways: Vec<(&Doc, &Value)> = docs
        .iter()
        .filter(|d| d.kind() == "Deployment")
        .flat_map(|d| d.containers().into_iter().map(move |c| (d, c)))
        .filter(|(_, c)| subcommand(&argv(c)) == Some("serve"))
        .collect();
    let [(d, c)] = gateways.as_slice() else {
        panic!(
            "want exactly one Deployment running `omnistage serve`, found {}",
            gateways.len()
        );
    };
    let a = argv(c);
    let file = a.iter().skip_while(|w| **w != "serve").nth(1).copied();
    assert_eq!(
        file,
        Some(DEPLOY_FILE),
        "{}: `serve` does not read {DEPLOY_FILE}",
        d.at()
    );
    assert!(
        mounts_deploy_config(d, c),
        "{}: does not mount ConfigMap {CONFIGMAP} at {DEPLOY_DIR}",
        d.at()
    );
    assert_eq!(flag(&a, "--host"), Some("0.0.0.0"), "{}: --host", d.at());
    assert_eq!(flag(&a, "--port"), Some("8000"), "{}: --port", d.at());
    assert!(
        declared_ports(c).iter().any(|(_, p)| *p == GATEWAY_PORT),
        "{}: containerPort {GATEWAY_PORT} not declared",
        d.at()
    );

    // Its Service selects the gateway pods (and no stage worker's) on port 8000.
    let labels = d.template_labels();
    let svcs: Vec<&Doc> = docs
        .iter()
        .filter(|s| s.kind() == "Service")
        .filter(|s| selects(&string_map(&s.value, "/spec/selector"), &labels))
        .collect();
    let [svc] = svcs.as_slice() else {
        panic!(
            "{}: want exactly one Service selecting its pods, found {}",
            d.at(),
            svcs.len()
        );
    };
    let port = list(&svc.value, "/spec/ports")
        .into_iter()
        .find(|p| p.get("port").and_then(Value::as_u64) == Some(GATEWAY_PORT))
        .unwrap_or_else(|| panic!("{}: no port {GATEWAY_PORT}", svc.at()));
    let target = port.get("targetPort").unwrap_or(&port["port"]);
    assert_eq!(
        resolve_port(c, target),
        Some(GATEWAY_PORT),
        "{}: targetPort is not the gateway's containerPort {GATEWAY_PORT}",
        svc.at()
    );
}

#[test]
fn every_service_selects_a_workload_and_its_target_ports() {
    let docs = docs();
    let mut problems = Vec::new();
    let workloads: Vec<&Doc> = docs.iter().filter(|d| d.is_workload()).collect();
    for w in &workloads {
        let sel = string_map(&w.value, "/spec/selector/matchLabels");
        if !selects(&sel, &w.template_labels()) {
            problems.push(format!(
                "{}: spec.selector.matchLabels is not a subset of the pod template's labels",
                w.at()
            ));
        }
        if w.kind() == "StatefulSet" {
            let svc = str_at(&w.value, "/spec/serviceName").unwrap_or_default();
            if !docs.iter().any(|d| d.is("Service", svc)) {
                problems.push(format!(
                    "{}: serviceName `{svc}` is no Service here",
                    w.at()
                ));
            }
        }
    }
    for s in docs.iter().filter(|d| d.kind() == "Service") {
        let sel = string_map(&s.value, "/spec/selector");
        let selected: Vec<&&Doc> = workloads
            .iter()
            .filter(|w| selects(&sel, &w.template_labels()))
            .collect();
        if selected.is_empty() {
            problems.push(format!(
                "{}: selector {sel:?} selects no pods of these manifests",
                s.at()
            ));
        }
        for p in list(&s.value, "/spec/ports") {
            let target = p
                .get("targetPort")
                .or_else(|| p.get("port"))
                .unwrap_or(&Value::Null);
            for w in &selected {
                if !w
                    .containers()
                    .iter()
                    .any(|c| resolve_port(c, target).is_some())
                {
                    problems.push(format!(
                        "{}: targetPort {target} is no containerPort of {}",
                        s.at(),
                        w.at()
                    ));
                }
            }
        }
    }
    // The etcd Service selects the etcd pods, on 2379.
    let etcd = docs
        .iter()
        .find(|d| d.is("Service", "etcd"))
        .expect("no Service etcd");
    let sel = string_map(&etcd.value, "/spec/selector");
    let etcd_pods = workloads
        .iter()
        .find(|w| {
            w.containers()
                .iter()
                .any(|c| str_at(c, "/image").is_some_and(|i| i.contains("/etcd:")))
        })
        .expect("no etcd workload");
    if !selects(&sel, &etcd_pods.template_labels()) {
        problems.push(format!(
            "{}: does not select the pods of {}",
            etcd.at(),
            etcd_pods.at()
        ));
    }
    report("Services", problems);
}

/// Kubernetes takes only strings in `command`, `args` and env values, and expands `$(VAR)` only
/// for variables the container defines (an unknown one stays literal).
#[test]
fn container_args_are_strings_and_their_variables_are_defined() {
    let docs = docs();
    let mut problems = Vec::new();
    for d in docs.iter().filter(|d| d.is_workload()) {
        let all = d
            .containers()
            .into_iter()
            .chain(list(d.pod_spec(), "/initContainers"));
        for c in all {
            let cname = str_at(c, "/name").unwrap_or("?");
            let words = list(c, "/command").into_iter().chain(list(c, "/args"));
            let env = list(c, "/env");
            for e in &env {
                if e.get("value").is_some_and(|v| !v.is_string()) {
                    problems.push(format!(
                        "{}: container {cname}: env {} value is not a string",
                        d.at(),
                        e["name"]
                    ));
                }
            }
            let defined: Vec<&str> = env.iter().filter_map(|e| str_at(e, "/name")).collect();
            for w in words {
                let Some(w) = w.as_str() else {
                    problems.push(format!(
                        "{}: container {cname}: argument {w} is not a string",
                        d.at()
                    ));
                    continue;
                };
                let mut rest = w;
                while let Some(start) = rest.find("$(") {
                    let Some(len) = rest[start + 2..].find(')') else {
                        break;
                    };
                    let var = &rest[start + 2..start + 2 + len];
                    if !defined.contains(&var) {
                        problems.push(format!("{}: container {cname}: `{w}` uses $({var}), which its env does not define", d.at()));
                    }
                    rest = &rest[start + 2 + len..];
                }
            }
            if str_at(c, "/image").is_none_or(str::is_empty) {
                problems.push(format!("{}: container {cname}: no image", d.at()));
            }
        }
    }
    report("containers", problems);
}
