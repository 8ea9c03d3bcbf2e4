//! Who a process is: its container and pod, from /proc/PID/cgroup.
//!
//! Container runtimes and the kubelet name cgroups after the container id and
//! the pod UID, so the process's cgroup path says which container and pod it
//! belongs to without asking the runtime (a node agent may not be allowed
//! to, and the answer would race the container's exit anyway).
//!
//! Forms recognised (`<id>` is 64 lowercase hex, `<uid>` a pod UID):
//!
//! * systemd cgroup driver: `.../kubepods[-<qos>]-pod<uid with _>.slice/`
//!   then `cri-containerd-<id>.scope`, `crio-<id>.scope`,
//!   `docker-<id>.scope`; Podman `libpod-<id>.scope` (also with a nested
//!   `container` cgroup); `crio-conmon-<id>.scope` is CRI-O's monitor, not
//!   the container.
//! * cgroupfs driver: `/kubepods[/<qos>]/pod<uid>/<id>` (or `crio-<id>`),
//!   `/docker/<id>`, `/libpod_parent/libpod-<id>`.
use std::{fs, io};

/// Who a process is, as far as its cgroup path tells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// 64-hex container id, when the process is in a container.
    pub container_id: Option<String>,
    /// Kubernetes pod UID with dashes (as the API shows it), when in a pod.
    pub pod_uid: Option<String>,
    /// Which runtime's naming the path used.
    pub runtime: Option<Runtime>,
}

/// The container runtime whose cgroup naming a path follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
}

impl Runtime {
    /// Stable lower-case name, for metric labels and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
        }
    }
}

/// Prefixes of a cgroup element naming a container, and whose naming it is.
/// `crio-conmon-<id>` needs no entry: `conmon-<id>` is not an id, so the
/// monitor yields nothing (likewise Podman's `libpod-conmon-<id>`).
const PREFIXES: &[(&str, Runtime)] = &[
    ("cri-containerd-", Runtime::Containerd),
    ("crio-", Runtime::CriO),
    ("docker-", Runtime::Docker),
    ("libpod-", Runtime::Podman),
];

/// The identity in the contents of /proc/PID/cgroup.
///
/// The cgroup v2 line (`0::/path`) wins when it names a container; otherwise
/// the first v1 line that does. On hybrid hosts the runtime may manage only
/// the v1 controllers, leaving the `0::` path with nothing in it. Text that
/// names no container gives [`Identity::default`].
pub fn parse_cgroup(text: &str) -> Identity {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        // hierarchy-id:controllers:path; the path itself may hold colons.
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let is_v2 = hierarchy == "0" && controllers.is_empty();
        if (is_v2 && v2.is_some()) || (!is_v2 && v1.is_some()) {
            continue;
        }
        let Some(identity) = parse_path(path) else {
            continue;
        };
        if is_v2 {
            v2 = Some(identity);
        } else {
            v1 = Some(identity);
        }
    }
    v2.or(v1).unwrap_or_default()
}

/// The identity of a running process. Errors are those of reading
/// /proc/PID/cgroup (typically `NotFound` once the process is gone).
pub fn of_pid(pid: u32) -> io::Result<Identity> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    Ok(parse_cgroup(&text))
}

/// The identity in one cgroup path, if it names a container.
fn parse_path(path: &str) -> Option<Identity> {
    // The kernel marks a removed v2 cgroup (seen from a dying process).
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    // Seen through a cgroup namespace, paths outside it start with `/..`.
    let elements: Vec<&str> = path
        .split('/')
        .filter(|e| !e.is_empty() && *e != "." && *e != "..")
        .collect();
    // The innermost container wins (e.g. Docker in Docker).
    let (at, id, runtime) = elements.iter().enumerate().rev().find_map(|(i, element)| {
        let parent = i.checked_sub(1).and_then(|p| elements.get(p)).copied();
        container_element(element, parent).map(|(id, runtime)| (i, id, runtime))
    })?;
    let pod_uid = elements
        .get(..at)
        .unwrap_or_default()
        .iter()
        .rev()
        .find_map(|element| pod_element(element));
    Some(Identity {
        container_id: Some(id.to_owned()),
        pod_uid,
        runtime,
    })
}

/// The container id and runtime one path element names, if any; `parent`
/// tells a Docker cgroupfs `/docker/<id>` from a kubelet cgroupfs bare id.
fn container_element<'a>(
    element: &'a str,
    parent: Option<&str>,
) -> Option<(&'a str, Option<Runtime>)> {
    if is_container_id(element) {
        let runtime = (parent == Some("docker")).then_some(Runtime::Docker);
        return Some((element, runtime));
    }
    let name = element.strip_suffix(".scope").unwrap_or(element);
    PREFIXES.iter().find_map(|(prefix, runtime)| {
        let id = name.strip_prefix(prefix)?;
        is_container_id(id).then_some((id, Some(*runtime)))
    })
}

/// The pod UID (with dashes) one path element names, if any: `pod<uid>`
/// (cgroupfs) or `kubepods[-<qos>]-pod<uid with _>.slice` (systemd, which
/// reserves `-` for its slice hierarchy; a kubelet with `--cgroup-root`,
/// e.g. kind's, prefixes it: `kubelet-kubepods-…`).
fn pod_element(element: &str) -> Option<String> {
    let uid = if let Some(uid) = element.strip_prefix("pod") {
        uid
    } else {
        let slice = element.strip_suffix(".slice")?;
        if !slice.split('-').any(|part| part == "kubepods") {
            return None;
        }
        let at = slice.rfind("-pod")?;
        slice.get(at + "-pod".len()..)?
    };
    let uid = uid.replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

/// Container ids of every runtime here are 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

/// 8-4-4-4-12 hex digits: the shape of UIDs the API server assigns. Static
/// pods' 32-hex config hashes fail this on purpose: the API shows their
/// mirror pods under a different UID.
fn is_uuid(s: &str) -> bool {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let mut parts = s.split('-');
    GROUPS.iter().all(|&len| {
        parts
            .next()
            .is_some_and(|p| p.len() == len && p.bytes().all(|b| b.is_ascii_hexdigit()))
    }) && parts.next().is_none()
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "2c9d9ddf2d9d8a4e1b5c1bd7c2e3f4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b";
    const ID2: &str = "8f14e45fceea167a5a36dedd4bea2543a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const UID: &str = "3f1c2e5a-9b7d-4c8e-a1f2-0d3b4c5e6f70";
    const UID_: &str = "3f1c2e5a_9b7d_4c8e_a1f2_0d3b4c5e6f70";

    fn ident(id: &str, uid: Option<&str>, runtime: Option<Runtime>) -> Identity {
        Identity {
            container_id: Some(id.to_owned()),
            pod_uid: uid.map(str::to_owned),
            runtime,
        }
    }

    /// A pure cgroup v2 file holding `path`.
    fn v2(path: &str) -> Identity {
        parse_cgroup(&format!("0::{path}\n"))
    }

    #[test]
    fn containerd_systemd_besteffort() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::Containerd)));
    }

    #[test]
    fn containerd_systemd_burstable() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::Containerd)));
    }

    #[test]
    fn containerd_systemd_guaranteed() {
        let path = format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::Containerd)));
    }

    #[test]
    fn crio_systemd() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"
        );
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::CriO)));
        let path = format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope");
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::CriO)));
    }

    #[test]
    fn crio_conmon_is_not_the_container() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope"
        );
        assert_eq!(v2(&path), Identity::default());
        let path = format!("/machine.slice/libpod-conmon-{ID}.scope");
        assert_eq!(v2(&path), Identity::default());
    }

    #[test]
    fn docker_under_kubelet_systemd() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope"
        );
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::Docker)));
    }

    #[test]
    fn cgroupfs_kubepods() {
        for qos in ["besteffort/", "burstable/", ""] {
            let path = format!("/kubepods/{qos}pod{UID}/{ID}");
            assert_eq!(v2(&path), ident(ID, Some(UID), None), "{path}");
        }
    }

    #[test]
    fn crio_cgroupfs() {
        let path = format!("/kubepods/burstable/pod{UID}/crio-{ID}");
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::CriO)));
    }

    #[test]
    fn docker_outside_kubernetes() {
        assert_eq!(
            v2(&format!("/docker/{ID}")),
            ident(ID, None, Some(Runtime::Docker))
        );
        assert_eq!(
            v2(&format!("/system.slice/docker-{ID}.scope")),
            ident(ID, None, Some(Runtime::Docker))
        );
        // Docker in Docker: the innermost container is the process's.
        assert_eq!(
            v2(&format!("/docker/{ID2}/docker/{ID}")),
            ident(ID, None, Some(Runtime::Docker))
        );
    }

    #[test]
    fn podman() {
        for path in [
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/libpod_parent/libpod-{ID}"),
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
        ] {
            assert_eq!(v2(&path), ident(ID, None, Some(Runtime::Podman)), "{path}");
        }
    }

    #[test]
    fn cgroup_v1_only() {
        let text = format!(
            "12:hugetlb:/kubepods/besteffort/pod{UID}/{ID}\n\
             11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n\
             5:memory:/kubepods/besteffort/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n"
        );
        assert_eq!(parse_cgroup(&text), ident(ID, Some(UID), None));
    }

    #[test]
    fn v1_takes_the_first_line_naming_a_container() {
        let text = format!(
            "12:pids:/\n\
             11:cpu,cpuacct:/system.slice/docker-{ID}.scope\n\
             4:memory:/system.slice/docker-{ID2}.scope\n\
             1:name=systemd:/system.slice/docker-{ID2}.scope\n"
        );
        assert_eq!(parse_cgroup(&text), ident(ID, None, Some(Runtime::Docker)));
    }

    #[test]
    fn hybrid_prefers_v2() {
        let text = format!(
            "9:memory:/kubepods/pod{UID}/{ID2}\n\
             1:name=systemd:/kubepods/pod{UID}/{ID2}\n\
             0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            ident(ID, Some(UID), Some(Runtime::Containerd))
        );
    }

    #[test]
    fn hybrid_falls_back_to_v1_when_v2_names_nothing() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        let text = format!(
            "12:cpuset:/\n\
             11:cpu,cpuacct:{path}\n\
             4:memory:{path}\n\
             1:name=systemd:{path}\n\
             0::/system.slice/containerd.service\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            ident(ID, Some(UID), Some(Runtime::Containerd))
        );
        // The same with the `0::` line first and an empty v2 path.
        let text = format!("0::/\n4:memory:{path}\n");
        assert_eq!(
            parse_cgroup(&text),
            ident(ID, Some(UID), Some(Runtime::Containerd))
        );
    }

    #[test]
    fn namespace_relative_paths() {
        let path = format!("/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::Containerd)));
        assert_eq!(v2(&format!("/../{ID}")), ident(ID, None, None));
        // The container's own namespace root: nothing to tell.
        assert_eq!(v2("/"), Identity::default());
    }

    #[test]
    fn nested_cgroup_root() {
        // A kubelet with --cgroup-root, or kind's node containers.
        let path = format!(
            "/docker/{ID2}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(v2(&path), ident(ID, Some(UID), Some(Runtime::Containerd)));
        // A slice merely ending in `-pod<uid>` is not a pod's.
        let path = format!("/system.slice/foo-pod{UID_}.slice/docker-{ID}.scope");
        assert_eq!(v2(&path), ident(ID, None, Some(Runtime::Docker)));
    }

    #[test]
    fn removed_cgroup_is_still_read() {
        let path = format!("/kubepods/pod{UID}/{ID} (deleted)");
        assert_eq!(v2(&path), ident(ID, Some(UID), None));
    }

    #[test]
    fn not_in_a_container() {
        for text in [
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "0::/\n",
            "0::/init.scope\n",
            "0::/system.slice/containerd.service\n",
            "12:memory:/user.slice\n1:name=systemd:/user.slice/user-1000.slice/session-2.scope\n0::/user.slice/user-1000.slice/session-2.scope\n",
            "",
        ] {
            assert_eq!(parse_cgroup(text), Identity::default(), "{text:?}");
        }
    }

    #[test]
    fn pod_without_container_is_not_an_identity() {
        // The pod slice itself (e.g. a process the kubelet put there).
        let path = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
        assert_eq!(v2(&path), Identity::default());
    }

    #[test]
    fn rejects_malformed_ids_and_uids() {
        // Upper case, 63 and 65 digits, non-hex.
        let upper = ID.to_ascii_uppercase();
        let short = &ID[..63];
        let long = format!("{ID}0");
        let nonhex = format!("{}g", &ID[..63]);
        for id in [upper.as_str(), short, &long, &nonhex] {
            assert_eq!(v2(&format!("/kubepods/pod{UID}/{id}")), Identity::default());
            assert_eq!(
                v2(&format!("/system.slice/docker-{id}.scope")),
                Identity::default()
            );
        }
        // A static pod's 32-hex config hash is not an API UID.
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6d2a3b0c9e8f7a6b5c4d3e2f1a0b9c8d.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(v2(&path), ident(ID, None, Some(Runtime::Containerd)));
        // Wrong group lengths.
        let path = format!("/kubepods/pod3f1c2e5a9-b7d-4c8e-a1f2-0d3b4c5e6f70/{ID}");
        assert_eq!(v2(&path), ident(ID, None, None));
    }

    #[test]
    fn runtime_names() {
        assert_eq!(Runtime::Containerd.name(), "containerd");
        assert_eq!(Runtime::CriO.name(), "cri-o");
        assert_eq!(Runtime::Docker.name(), "docker");
        assert_eq!(Runtime::Podman.name(), "podman");
    }

    /// Truncations and garbage must not panic, and must not invent an id.
    #[test]
    fn odd_input_does_not_panic() {
        let good = format!(
            "11:cpu,cpuacct:/kubepods/pod{UID}/{ID}\n\
             0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        // Every prefix, cut at each char boundary.
        for (i, _) in good.char_indices() {
            let id = parse_cgroup(&good[..i]);
            if let Some(found) = &id.container_id {
                assert!(is_container_id(found), "{found:?} from {:?}", &good[..i]);
            }
        }
        let junk = [
            ":",
            "::",
            ":::::",
            "0:",
            "0::",
            "0::/..",
            "0::/../../..",
            "0::////",
            "0::pod",
            "0::/kubepods-pod.slice",
            "0::/kubepods-pod-.slice/x",
            "0::/pod/",
            "0::/crio-",
            "0::/crio-.scope",
            "0::/.scope",
            "0::/kubepods-\u{e9}-pod\u{1f600}.slice/docker-\u{e9}.scope",
            "\u{0}\u{0}\n\u{ffff}:\u{1}:\u{2}",
            "x:y:z:w",
            "0::/docker/\n0::/docker",
            "   \n\t\n",
        ];
        for text in junk {
            assert_eq!(parse_cgroup(text), Identity::default(), "{text:?}");
        }
        // A pseudo-random byte soup, lossily decoded.
        const SOUP: &[u8] = b":/-_.pod0123456789abcdefx\n\xff";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..500 {
            let bytes: Vec<u8> = (0..96)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    SOUP[(state % SOUP.len() as u64) as usize]
                })
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_cgroup(&text);
        }
    }

    #[test]
    fn of_pid_reads_self() {
        // Whatever this process's cgroup is, reading it works.
        assert!(of_pid(std::process::id()).is_ok());
        assert!(of_pid(u32::MAX).is_err());
    }
}
