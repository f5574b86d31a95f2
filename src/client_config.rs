//! `cachalot client-config`: what to write where so that a client pulls through the mirror, for
//! the upstreams of a config. Pure: the command line prints the snippets or writes them.
//!
//! Each client reaches the mirror in its own routing mode (README, "Using it"): Docker's
//! `registry-mirrors` sends Docker Hub's paths to the default upstream, containerd and k3s send
//! `?ns=<registry>` (so an upstream's name must be the registry's host), podman and CRI-O send
//! the registry's name as the first path component.

use crate::config::Config;
use std::fmt::Write;

/// The clients `client-config` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Client {
    Docker,
    Containerd,
    Podman,
    K3s,
    Kind,
}

/// How the clients reach the mirror.
#[derive(Clone, Debug)]
pub struct Options {
    /// The mirror's base URL as the clients reach it (`http://mirror:5000`).
    pub mirror: url::Url,
    /// Upstream names to configure; all of the config's when empty.
    pub registries: Vec<String>,
    /// Do not verify the mirror's certificate (or: it serves plain HTTP).
    pub insecure: bool,
    /// The CA that signed the mirror's certificate, as a path on the client's machine.
    pub ca_file: Option<String>,
}

/// One file to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snippet {
    /// Where it goes on the client's machine.
    pub path: String,
    /// Where `--output-dir` puts it.
    pub relative: String,
    pub content: String,
}

/// The snippets, and notes for the person applying them.
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub snippets: Vec<Snippet>,
    pub notes: Vec<String>,
}

/// Parses `--mirror`: an http(s) URL of a host, with nothing after the port.
pub fn parse_mirror(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s).map_err(|e| format!("--mirror: {s:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!(
            "--mirror: {s:?} must be http:// or https:// and a host, such as http://mirror:5000"
        ));
    }
    if u.path() != "/" || u.query().is_some() {
        return Err(format!(
            "--mirror: {s:?} must be the mirror's base URL, without a path"
        ));
    }
    Ok(u)
}

impl Options {
    /// `http://host:port`, without the trailing slash.
    fn base(&self) -> String {
        self.mirror.as_str().trim_end_matches('/').to_owned()
    }

    /// `host:port`, as registries are named.
    fn authority(&self) -> String {
        let host = self.mirror.host_str().unwrap_or_default();
        match self.mirror.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        }
    }

    /// Whether the client must not verify TLS: asked for, or the mirror is plain HTTP.
    fn plain_or_insecure(&self) -> bool {
        self.insecure || self.mirror.scheme() == "http"
    }
}

/// The upstreams to configure, as (name, url, default), in the config's order.
fn registries<'a>(
    config: &'a Config,
    opts: &Options,
) -> Result<Vec<(&'a str, &'a str, bool)>, String> {
    for r in &opts.registries {
        if !config.upstream.iter().any(|u| &u.name == r) {
            let known: Vec<&str> = config.upstream.iter().map(|u| u.name.as_str()).collect();
            return Err(format!(
                "--registries: {r:?} is not an upstream of the config (it has: {})",
                known.join(", ")
            ));
        }
    }
    Ok(config
        .upstream
        .iter()
        .filter(|u| opts.registries.is_empty() || opts.registries.contains(&u.name))
        .map(|u| (u.name.as_str(), u.url.as_str(), u.default))
        .collect())
}

/// TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// What `client` needs to pull through the mirror.
pub fn render(client: Client, config: &Config, opts: &Options) -> Result<Output, String> {
    let regs = registries(config, opts)?;
    if regs.is_empty() {
        return Err("--registries: no upstream to configure".into());
    }
    let mut out = Output::default();
    match client {
        Client::Docker => docker(&regs, opts, &mut out)?,
        Client::Containerd => containerd(&regs, opts, &mut out),
        Client::Podman => podman(&regs, opts, &mut out),
        Client::K3s => k3s(&regs, opts, &mut out),
        Client::Kind => kind(&regs, opts, &mut out),
    }
    Ok(out)
}

fn docker(regs: &[(&str, &str, bool)], opts: &Options, out: &mut Output) -> Result<(), String> {
    // The daemon's mirrors apply to Docker Hub only, and send its paths without a registry
    // name, which the mirror routes to its default upstream.
    if !regs.iter().any(|(n, _, d)| *n == "docker.io" && *d) {
        return Err("docker: the Docker daemon's registry-mirrors only mirror Docker Hub, and needs an upstream named \"docker.io\" with default = true".into());
    }
    let mut daemon = serde_json::json!({ "registry-mirrors": [opts.base()] });
    if opts.plain_or_insecure() {
        daemon["insecure-registries"] = serde_json::json!([opts.authority()]);
    }
    let content = serde_json::to_string_pretty(&daemon).expect("JSON of strings") + "\n";
    out.snippets.push(Snippet {
        path: "/etc/docker/daemon.json".into(),
        relative: "daemon.json".into(),
        content,
    });
    out.notes.push(
        "Docker's registry-mirrors mirror Docker Hub only: other registries are pulled from their origin. Merge these keys into an existing daemon.json, then restart dockerd.".into(),
    );
    if let Some(ca) = &opts.ca_file {
        out.notes.push(format!(
            "copy {ca} to /etc/docker/certs.d/{}/ca.crt",
            opts.authority()
        ));
    }
    Ok(())
}

/// A `hosts.toml` for one registry: the mirror first, the origin (`server`) as the fallback.
fn hosts_toml(server: Option<&str>, opts: &Options) -> String {
    let mut s = String::new();
    if let Some(server) = server {
        let _ = writeln!(s, "server = {}", q(server));
        s.push('\n');
    }
    let _ = writeln!(s, "[host.{}]", q(&opts.base()));
    s.push_str("  capabilities = [\"pull\", \"resolve\"]\n");
    if opts.insecure {
        s.push_str("  skip_verify = true\n");
    }
    if let Some(ca) = &opts.ca_file {
        let _ = writeln!(s, "  ca = {}", q(ca));
    }
    s
}

/// The origin a client falls back to for a registry: Docker Hub's API host, else the
/// upstream's own URL.
fn origin(name: &str, url: &str) -> String {
    if name == "docker.io" {
        "https://registry-1.docker.io".into()
    } else {
        url.trim_end_matches('/').to_owned()
    }
}

fn containerd(regs: &[(&str, &str, bool)], opts: &Options, out: &mut Output) {
    for (name, url, _) in regs {
        out.snippets.push(Snippet {
            path: format!("/etc/containerd/certs.d/{name}/hosts.toml"),
            relative: format!("certs.d/{name}/hosts.toml"),
            content: hosts_toml(Some(&origin(name, url)), opts),
        });
    }
    out.snippets.push(Snippet {
        path: "/etc/containerd/certs.d/_default/hosts.toml".into(),
        relative: "certs.d/_default/hosts.toml".into(),
        content: hosts_toml(None, opts),
    });
    out.notes.push(
        "containerd reads these when its CRI registry config_path is /etc/containerd/certs.d (config.toml: [plugins.\"io.containerd.grpc.v1.cri\".registry] config_path = \"/etc/containerd/certs.d\"); ctr takes --hosts-dir /etc/containerd/certs.d. _default sends every other registry to the mirror too, which answers for the upstreams it has and lets containerd fall back to the origin for the rest.".into(),
    );
}

fn podman(regs: &[(&str, &str, bool)], opts: &Options, out: &mut Output) {
    let mut s = String::new();
    for (name, _, _) in regs {
        let _ = writeln!(s, "[[registry]]");
        let _ = writeln!(s, "prefix = {}", q(name));
        let _ = writeln!(s, "location = {}", q(name));
        s.push('\n');
        let _ = writeln!(s, "[[registry.mirror]]");
        // The registry's name as the first path component: the mirror's path-prefix routing.
        let _ = writeln!(
            s,
            "location = {}",
            q(&format!("{}/{name}", opts.authority()))
        );
        if opts.plain_or_insecure() {
            s.push_str("insecure = true\n");
        }
        s.push('\n');
    }
    out.snippets.push(Snippet {
        path: "/etc/containers/registries.conf.d/50-cachalot.conf".into(),
        relative: "registries.conf.d/50-cachalot.conf".into(),
        content: s,
    });
    if let Some(ca) = &opts.ca_file {
        out.notes.push(format!(
            "copy {ca} to /etc/containers/certs.d/{}/ca.crt",
            opts.authority()
        ));
    }
}

fn k3s(regs: &[(&str, &str, bool)], opts: &Options, out: &mut Output) {
    let mut s = String::from("mirrors:\n");
    for (name, _, _) in regs {
        let _ = writeln!(s, "  {}:", q(name));
        let _ = writeln!(s, "    endpoint:\n      - {}", q(&opts.base()));
    }
    if opts.insecure || opts.ca_file.is_some() {
        let _ = writeln!(s, "configs:\n  {}:\n    tls:", q(&opts.authority()));
        if opts.insecure {
            s.push_str("      insecure_skip_verify: true\n");
        }
        if let Some(ca) = &opts.ca_file {
            let _ = writeln!(s, "      ca_file: {}", q(ca));
        }
    }
    out.snippets.push(Snippet {
        path: "/etc/rancher/k3s/registries.yaml".into(),
        relative: "registries.yaml".into(),
        content: s,
    });
    out.notes.push(
        "k3s reads registries.yaml at start: restart k3s (or k3s-agent) on each node.".into(),
    );
}

fn kind(regs: &[(&str, &str, bool)], opts: &Options, out: &mut Output) {
    let mut s = String::from(
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\ncontainerdConfigPatches:\n  - |-\n",
    );
    for (name, _, _) in regs {
        let _ = writeln!(
            s,
            "    [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.{}]\n      endpoint = [{}]",
            q(name),
            q(&opts.base())
        );
    }
    if opts.insecure {
        let _ = writeln!(
            s,
            "    [plugins.\"io.containerd.grpc.v1.cri\".registry.configs.{}.tls]\n      insecure_skip_verify = true",
            q(&opts.authority())
        );
    }
    out.snippets.push(Snippet {
        path: "kind-cluster.yaml".into(),
        relative: "kind-cluster.yaml".into(),
        content: s,
    });
    out.notes.push(
        "kind create cluster --config kind-cluster.yaml; the mirror's host must be reachable from the kind nodes' network (not 127.0.0.1).".into(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(mirror: &str) -> Options {
        Options {
            mirror: parse_mirror(mirror).unwrap(),
            registries: Vec::new(),
            insecure: false,
            ca_file: None,
        }
    }

    #[test]
    fn mirror_must_be_a_base_url() {
        assert!(parse_mirror("http://mirror:5000").is_ok());
        assert!(parse_mirror("http://mirror:5000/").is_ok());
        for bad in ["mirror:5000", "ftp://m", "http://m/v2", "http://m?x=1", ""] {
            let e = parse_mirror(bad).unwrap_err();
            assert!(e.starts_with("--mirror"), "{e}");
        }
    }

    #[test]
    fn docker_mirrors_docker_hub_only_and_says_so() {
        let c = Config::builtin_default();
        let out = render(Client::Docker, &c, &opts("http://mirror:5000")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out.snippets[0].content).unwrap();
        assert_eq!(v["registry-mirrors"][0], "http://mirror:5000");
        assert_eq!(v["insecure-registries"][0], "mirror:5000");
        assert!(out.notes[0].contains("Docker Hub only"));
        let mut o = opts("https://mirror");
        o.registries = vec!["ghcr.io".into()];
        let e = render(Client::Docker, &c, &o).unwrap_err();
        assert!(e.contains("Docker Hub"), "{e}");
        let v: serde_json::Value = serde_json::from_str(
            &render(Client::Docker, &c, &opts("https://mirror"))
                .unwrap()
                .snippets[0]
                .content,
        )
        .unwrap();
        assert!(v.get("insecure-registries").is_none());
    }

    #[test]
    fn containerd_gets_a_hosts_toml_per_registry_and_a_default() {
        let c = Config::builtin_default();
        let mut o = opts("https://mirror:5000");
        o.ca_file = Some("/etc/ssl/mirror-ca.pem".into());
        let out = render(Client::Containerd, &c, &o).unwrap();
        assert_eq!(out.snippets.len(), c.upstream.len() + 1);
        let hub = &out.snippets[0];
        assert_eq!(hub.relative, "certs.d/docker.io/hosts.toml");
        let t: toml::Table = toml::from_str(&hub.content).unwrap();
        assert_eq!(t["server"].as_str(), Some("https://registry-1.docker.io"));
        let host = &t["host"]["https://mirror:5000"];
        assert_eq!(host["ca"].as_str(), Some("/etc/ssl/mirror-ca.pem"));
        assert_eq!(host["capabilities"].as_array().unwrap().len(), 2);
        let default = out.snippets.last().unwrap();
        assert_eq!(default.relative, "certs.d/_default/hosts.toml");
        let t: toml::Table = toml::from_str(&default.content).unwrap();
        assert!(t.get("server").is_none());
        assert!(t["host"].get("https://mirror:5000").is_some());
    }

    #[test]
    fn podman_mirrors_by_path_prefix() {
        let c = Config::builtin_default();
        let mut o = opts("http://mirror:5000");
        o.registries = vec!["docker.io".into(), "quay.io".into()];
        let out = render(Client::Podman, &c, &o).unwrap();
        let t: toml::Table = toml::from_str(&out.snippets[0].content).unwrap();
        let regs = t["registry"].as_array().unwrap();
        assert_eq!(regs.len(), 2);
        assert_eq!(regs[1]["prefix"].as_str(), Some("quay.io"));
        let mirror = &regs[1]["mirror"].as_array().unwrap()[0];
        assert_eq!(mirror["location"].as_str(), Some("mirror:5000/quay.io"));
        assert_eq!(mirror["insecure"].as_bool(), Some(true));
    }

    #[test]
    fn k3s_and_kind_name_every_registry() {
        let c = Config::builtin_default();
        let mut o = opts("http://10.0.0.5:5000");
        o.insecure = true;
        let k3s = render(Client::K3s, &c, &o).unwrap();
        let text = &k3s.snippets[0].content;
        for u in &c.upstream {
            assert!(text.contains(&format!("  \"{}\":\n", u.name)), "{text}");
        }
        assert!(text.contains("insecure_skip_verify: true"));
        let kind = render(Client::Kind, &c, &o).unwrap();
        let text = &kind.snippets[0].content;
        // The patch is TOML inside the YAML: it must parse as such.
        let patch: String = text
            .lines()
            .skip_while(|l| !l.starts_with("  - |-"))
            .skip(1)
            .map(|l| format!("{}\n", l.trim_start()))
            .collect();
        let t: toml::Table = toml::from_str(&patch).unwrap();
        let mirrors = &t["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["mirrors"];
        assert_eq!(
            mirrors["ghcr.io"]["endpoint"][0].as_str(),
            Some("http://10.0.0.5:5000")
        );
    }

    #[test]
    fn an_unknown_registry_is_named() {
        let c = Config::builtin_default();
        let mut o = opts("http://m:5000");
        o.registries = vec!["nope.example".into()];
        let e = render(Client::Containerd, &c, &o).unwrap_err();
        assert!(
            e.contains("nope.example") && e.contains("--registries"),
            "{e}"
        );
    }
}
