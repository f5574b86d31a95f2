//! Who the members are: the peer list of `[cluster]` (or the addresses `peers_dns` resolves to)
//! and which of them is this replica.
//!
//! Every replica must name every member, itself included, by the same URL, since the owner of a
//! key is computed from those URLs. Static peers are taken as written (normalized by the url
//! crate). Resolved peers are `<scheme>://<ip>:<port>/`, with one address family (IPv4 when
//! the answer holds any), so that a dual-stack Service does not list each replica twice.

use super::Peer;
use crate::config::{ClusterConfig, ConfigError};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use url::Url;

/// Where the other members come from.
#[derive(Debug)]
pub(super) enum Source {
    /// `cluster.peers`, this replica left out.
    Static(Vec<Peer>),
    /// `cluster.peers_dns` (`host:port`), resolved again and again.
    Dns { name: String, scheme: String },
}

/// This replica and where the others come from, as `cfg` says or as detected from `listen`
/// and this machine's addresses.
pub(super) fn configure(
    cfg: &ClusterConfig,
    listen: SocketAddr,
) -> Result<(Peer, Source), ConfigError> {
    let me = cfg
        .self_url
        .as_deref()
        .map(|s| base_url(s, "cluster.self"))
        .transpose()?;
    if let Some(name) = &cfg.peers_dns {
        if !cfg.peers.is_empty() {
            return bad("cluster.peers: set either peers or peers_dns".into());
        }
        let port = match name.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => p.parse::<u16>().ok(),
            _ => None,
        }
        .ok_or_else(|| invalid(format!("cluster.peers_dns: {name:?} is not host:port")))?;
        let scheme = me.as_ref().map_or("http", |m| m.url.scheme()).to_owned();
        let me = match me {
            Some(me) => me,
            // The others reach this replica at the address they resolve, on the name's port.
            None if !listen.ip().is_unspecified() => {
                peer_at(&scheme, SocketAddr::new(listen.ip(), port)).ok_or_else(|| {
                    invalid(format!(
                        "cluster.self: cannot name {listen} in a URL; set it"
                    ))
                })?
            }
            None => detect_resolved(name, port, &scheme)?,
        };
        return Ok((
            me,
            Source::Dns {
                name: name.clone(),
                scheme,
            },
        ));
    }
    if cfg.peers.is_empty() {
        return bad("cluster.peers: set either peers or peers_dns".into());
    }
    let mut peers = Vec::with_capacity(cfg.peers.len());
    for (i, p) in cfg.peers.iter().enumerate() {
        let peer = base_url(p, &format!("cluster.peers[{i}]"))?;
        if peers.contains(&peer) {
            return bad(format!("cluster.peers[{i}]: {p:?} is listed twice"));
        }
        peers.push(peer);
    }
    let me = match me {
        Some(me) if peers.contains(&me) => me,
        Some(me) => {
            return bad(format!(
                "cluster.self: {} is not one of cluster.peers (every replica must list every \
                 replica, itself included)",
                me.url
            ));
        }
        None => detect_listed(&peers, listen)?,
    };
    peers.retain(|p| *p != me);
    Ok((me, Source::Static(peers)))
}

/// The members `addrs` (a resolution of `peers_dns`) name.
pub(super) fn resolved_peers(
    addrs: impl IntoIterator<Item = SocketAddr>,
    scheme: &str,
) -> Vec<Peer> {
    let mut peers: Vec<Peer> = one_family(addrs.into_iter().collect())
        .into_iter()
        .filter_map(|a| peer_at(scheme, a))
        .collect();
    peers.sort_by(|a, b| a.url.as_str().cmp(b.url.as_str()));
    peers.dedup();
    peers
}

/// The entry of `peers` that is this replica: the one on `listen`'s port whose host is one of
/// this machine's addresses (`listen`'s own address, when it names one).
fn detect_listed(peers: &[Peer], listen: SocketAddr) -> Result<Peer, ConfigError> {
    let mine: Vec<&Peer> = peers
        .iter()
        .filter(|p| p.url.port_or_known_default() == Some(listen.port()))
        .filter(|p| {
            p.url.socket_addrs(|| None).is_ok_and(|addrs| {
                addrs.iter().any(|a| {
                    if listen.ip().is_unspecified() {
                        is_local(a.ip())
                    } else {
                        a.ip() == listen.ip()
                    }
                })
            })
        })
        .collect();
    match mine.as_slice() {
        [me] => Ok((*me).clone()),
        [] => bad(format!(
            "cluster.self: no entry of cluster.peers is this replica (an address of this machine \
             with port {}); set cluster.self",
            listen.port()
        )),
        several => bad(format!(
            "cluster.self: several entries of cluster.peers are this replica ({}); set cluster.self",
            several
                .iter()
                .map(|p| p.url.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The addresses among `addrs` (of one family, as [`one_family`] picks) that are this
/// machine's, sorted and without repeats.
fn local_ips(addrs: Vec<SocketAddr>) -> Vec<IpAddr> {
    let mut local: Vec<IpAddr> = one_family(addrs)
        .iter()
        .map(|a| a.ip())
        .filter(|ip| is_local(*ip))
        .collect();
    local.sort();
    local.dedup();
    local
}

/// This replica among the addresses `name` resolves to; failing that (a headless Service lists
/// a replica only once it is ready, and the first one never would be), the one address of this
/// machine's host name, as a pod's `/etc/hosts` maps it.
fn detect_resolved(name: &str, port: u16, scheme: &str) -> Result<Peer, ConfigError> {
    let resolved = name
        .to_socket_addrs()
        .map(Vec::from_iter)
        .unwrap_or_default();
    let mut local = local_ips(resolved);
    if local.is_empty()
        && let Some(host) = hostname()
    {
        let addrs = (host.as_str(), port)
            .to_socket_addrs()
            .map(Vec::from_iter)
            .unwrap_or_default();
        local = local_ips(
            addrs
                .into_iter()
                .filter(|a| !a.ip().is_loopback())
                .collect(),
        );
    }
    match local.as_slice() {
        [ip] => peer_at(scheme, SocketAddr::new(*ip, port))
            .ok_or_else(|| invalid(format!("cluster.self: cannot name {ip} in a URL; set it"))),
        [] => bad(format!(
            "cluster.self: none of the addresses of {name} or of this host's name is this \
             machine's; set cluster.self (or server.listen to this replica's address)"
        )),
        several => bad(format!(
            "cluster.self: several addresses of {name} are this machine's ({several:?}); set \
             cluster.self"
        )),
    }
}

/// A base URL (`http(s)://host[:port]/`, nothing after the slash), or an error naming `key`.
fn base_url(s: &str, key: &str) -> Result<Peer, ConfigError> {
    match Url::parse(s) {
        Ok(url)
            if matches!(url.scheme(), "http" | "https")
                && url.host().is_some()
                && url.path() == "/"
                && url.query().is_none()
                && url.fragment().is_none()
                && url.username().is_empty()
                && url.password().is_none() =>
        {
            Ok(Peer { url })
        }
        _ => bad(format!(
            "{key}: {s:?} is not a base URL such as http://10.0.0.11:5000"
        )),
    }
}

fn peer_at(scheme: &str, addr: SocketAddr) -> Option<Peer> {
    // An IPv6 scope id (`%eth0`) has no URL form; such an address cannot be a peer.
    Url::parse(&format!("{scheme}://{addr}/"))
        .ok()
        .map(|url| Peer { url })
}

/// The IPv4 addresses of `addrs` if there are any, else all of them.
fn one_family(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if addrs.iter().any(SocketAddr::is_ipv4) {
        addrs.retain(SocketAddr::is_ipv4);
    }
    addrs
}

/// Whether `ip` is one of this machine's addresses: binding to it succeeds only then. There is
/// no safe interface-listing API in std, and this asks the kernel the very question.
fn is_local(ip: IpAddr) -> bool {
    !ip.is_unspecified() && !ip.is_multicast() && UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(message)
}

fn bad<T>(message: String) -> Result<T, ConfigError> {
    Err(invalid(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(peers: &[&str], me: Option<&str>) -> ClusterConfig {
        ClusterConfig {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            self_url: me.map(str::to_owned),
            ..Default::default()
        }
    }

    fn listen(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn err(c: &ClusterConfig, l: &str) -> String {
        configure(c, listen(l)).unwrap_err().to_string()
    }

    #[test]
    fn self_is_the_local_entry_on_the_listen_port() {
        let c = cfg(
            &[
                "http://192.0.2.1:5001",
                "http://127.0.0.1:5000",
                "http://127.0.0.1:5001",
            ],
            None,
        );
        let (me, source) = configure(&c, listen("0.0.0.0:5001")).unwrap();
        assert_eq!(me.url.as_str(), "http://127.0.0.1:5001/");
        let Source::Static(others) = source else {
            panic!("static peers")
        };
        let others: Vec<&str> = others.iter().map(|p| p.url.as_str()).collect();
        assert_eq!(others, ["http://192.0.2.1:5001/", "http://127.0.0.1:5000/"]);
        // A listen address that names one of this machine's addresses picks that one.
        let c = cfg(&["http://127.0.0.1:5000", "http://127.0.0.2:5000"], None);
        let (me, _) = configure(&c, listen("127.0.0.2:5000")).unwrap();
        assert_eq!(me.url.as_str(), "http://127.0.0.2:5000/");
    }

    #[test]
    fn self_undetectable_or_ambiguous_or_unlisted_names_the_key() {
        let c = cfg(&["http://192.0.2.1:5000", "http://127.0.0.1:5000"], None);
        let e = err(&c, "0.0.0.0:6000");
        assert!(
            e.starts_with("cluster.self: no entry") && e.contains("port 6000"),
            "{e}"
        );
        let c = cfg(&["http://127.0.0.1:5000", "http://localhost:5000"], None);
        let e = err(&c, "0.0.0.0:5000");
        assert!(
            e.starts_with("cluster.self: several") && e.contains("http://localhost:5000/"),
            "{e}"
        );
        let c = cfg(&["http://127.0.0.1:5000"], Some("http://127.0.0.1:5001"));
        assert!(
            err(&c, "0.0.0.0:5000")
                .starts_with("cluster.self: http://127.0.0.1:5001/ is not one of")
        );
        // Written differently, the same URL.
        let c = cfg(&["http://127.0.0.1:5000/"], Some("HTTP://127.0.0.1:5000"));
        assert_eq!(
            configure(&c, listen("0.0.0.0:1")).unwrap().0.url.as_str(),
            "http://127.0.0.1:5000/"
        );
    }

    #[test]
    fn bad_peer_lists_name_the_entry() {
        let c = cfg(&["http://127.0.0.1:5000", "10.0.0.1:5000"], None);
        assert!(err(&c, "0.0.0.0:5000").starts_with("cluster.peers[1]: "));
        let c = cfg(&["http://127.0.0.1:5000", "http://127.0.0.1:5000/"], None);
        assert!(
            err(&c, "0.0.0.0:5000")
                .starts_with("cluster.peers[1]: \"http://127.0.0.1:5000/\" is listed twice")
        );
        let c = cfg(&["http://127.0.0.1:5000/v2/"], None);
        assert!(err(&c, "0.0.0.0:5000").starts_with("cluster.peers[0]: "));
        let dns = |d: &str| ClusterConfig {
            peers_dns: Some(d.into()),
            ..Default::default()
        };
        assert!(err(&dns("svc"), "0.0.0.0:5000").starts_with("cluster.peers_dns: "));
        assert!(err(&dns(":5000"), "0.0.0.0:5000").starts_with("cluster.peers_dns: "));
    }

    #[test]
    fn with_dns_self_is_the_local_resolved_address() {
        let c = ClusterConfig {
            peers_dns: Some("localhost:5000".into()),
            ..Default::default()
        };
        let (me, source) = configure(&c, listen("0.0.0.0:5000")).unwrap();
        assert_eq!(me.url.as_str(), "http://127.0.0.1:5000/");
        assert!(matches!(source, Source::Dns { ref scheme, .. } if scheme == "http"));
        // A listen address is this replica's, on the Service's port; `self` sets the scheme.
        let (me, _) = configure(&c, listen("127.0.0.3:5001")).unwrap();
        assert_eq!(me.url.as_str(), "http://127.0.0.3:5000/");
        let c = ClusterConfig {
            self_url: Some("https://10.1.2.3:5000".into()),
            ..c
        };
        let (me, source) = configure(&c, listen("0.0.0.0:5000")).unwrap();
        assert_eq!(me.url.as_str(), "https://10.1.2.3:5000/");
        assert!(matches!(source, Source::Dns { ref scheme, .. } if scheme == "https"));
    }

    #[test]
    fn resolved_addresses_become_one_url_per_replica() {
        let addrs = [
            "10.0.0.12:5000",
            "[fd00::11]:5000",
            "10.0.0.11:5000",
            "10.0.0.12:5000",
        ];
        let peers = resolved_peers(addrs.map(|a| a.parse().unwrap()), "http");
        let urls: Vec<&str> = peers.iter().map(|p| p.url.as_str()).collect();
        assert_eq!(urls, ["http://10.0.0.11:5000/", "http://10.0.0.12:5000/"]);
        let v6 = resolved_peers(["[fd00::11]:5000".parse().unwrap()], "https");
        assert_eq!(v6[0].url.as_str(), "https://[fd00::11]:5000/");
    }
}
