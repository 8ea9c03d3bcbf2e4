//! Bad input: a pid that is gone, is not a Go program, or runs an
//! unsupported Go release gets one clear log line, and the agent serves the
//! others; bad flags and an unreachable Kubernetes API are refused with the
//! reason.
mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use support::{Agent, Target};

#[test]
fn bad_pids_are_reported_and_the_rest_is_served() {
    if !support::have_root() {
        return;
    }
    let go = support::go_tool("1.27.3");
    let old_go = support::debian_go();
    if !support::prerequisite(
        go.is_some(),
        "Go 1.27.3 is not installed (cargo xtask setup)",
    ) || !support::prerequisite(
        old_go.is_some(),
        "Debian's golang-go (Go 1.19) is not installed",
    ) {
        return;
    }
    let good_bin = support::build_fixture("gcload", &go.unwrap(), "1.27.3", &[]);
    let old_bin = support::build_fixture("idle", &old_go.unwrap(), "debian", &[]);

    let mut good = Target::spawn(&good_bin, &["2", "0"]);
    let old = Target::spawn(&old_bin, &[]);
    let mut not_go = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("sleep");
    let mut dead = Command::new("true").spawn().expect("true");
    let dead_pid = dead.id();
    dead.wait().unwrap();

    let mut agent = Agent::spawn(&[dead_pid, not_go.id(), good.pid, old.pid]);
    let line = agent.wait_log(&format!("pid {dead_pid}:"), Duration::from_secs(30));
    assert!(line.contains("no such process"), "{line}");
    let line = agent.wait_log(&format!("pid {}:", not_go.id()), Duration::from_secs(30));
    assert!(line.contains("not a Go program"), "{line}");
    let line = agent.wait_log(&format!("pid {}:", old.pid), Duration::from_secs(30));
    assert!(
        line.contains("go1.19")
            && line.contains("not supported")
            && line.contains("go1.21 to go1.27"),
        "{line}"
    );

    // Not every requested pid is watched, so not ready; the good one is.
    let (status, _) = agent.get("/readyz");
    assert_eq!(status, 503);
    assert_eq!(agent.get("/healthz").0, 200);
    let pid = good.pid.to_string();
    let m = agent.scrape();
    assert!(m.value("gopulse_probes_attached", &[("pid", &pid)]) >= 3.0);
    for bad in [dead_pid, not_go.id(), old.pid] {
        assert!(
            !m.has("gopulse_probes_attached", &[("pid", &bad.to_string())]),
            "pid {bad} has series"
        );
    }

    good.send("go");
    let truth: serde_json::Value =
        serde_json::from_str(&good.read_line(Duration::from_secs(60))).unwrap();
    let cycles = truth["numgc"].as_f64().unwrap();
    assert_eq!(cycles, 2.0);
    let m = agent.scrape_until(Duration::from_secs(10), |m| {
        m.cycles_seen(&[("pid", &pid)]) >= cycles
    });
    assert_eq!(m.cycles_seen(&[("pid", &pid)]), cycles);
    assert_eq!(
        m.value("go_memory_gc_cycles_total", &[("pid", &pid)]),
        cycles
    );

    // When the watched process exits, its series go away.
    good.send("exit");
    good.finish();
    agent.wait_log("process exited", Duration::from_secs(10));
    let m = agent.scrape();
    assert!(!m.has("gopulse_gc_pause_seconds_count", &[("pid", &pid)]));
    assert!(!m.has("go_memory_gc_cycles_total", &[("pid", &pid)]));

    let _ = not_go.kill();
    let _ = not_go.wait();
    old.finish();
    agent.stop();
}

/// Flags that cannot work are refused before anything is loaded: usage
/// errors (exit 2) name the flag; a selection that needs the Kubernetes API
/// without one is a fatal error (exit 1) that says what is missing.
#[test]
fn bad_flags_are_refused_with_the_reason() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("gopulse");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, needle) in [
        (&["--labels", "pid,podname"][..], "podname"),
        (&["--pod-selector", "env in prod"][..], "--pod-selector"),
        (&["--exe-regex", "("][..], "--exe-regex"),
        (&["--max-processes", "0"][..], "--max-processes"),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let (code, err) = run(&["--namespace", "shop", "--kubernetes", "off"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("need the Kubernetes API"), "{err}");
}

/// OTLP settings that cannot work are refused before anything is attached,
/// naming the flag or variable.
#[test]
fn bad_otlp_settings_are_refused_with_the_reason() {
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .envs(envs.iter().copied())
            .output()
            .expect("gopulse");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--otlp-protocol", "http/json"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--otlp-protocol"), "{err}");
    for (args, envs, needle) in [
        (
            &["--otlp-endpoint", "collector:4318"][..],
            &[][..],
            "--otlp-endpoint",
        ),
        (&["--otlp-endpoint", "https://c:4318"][..], &[][..], "TLS"),
        (
            &[][..],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ][..],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            &["--otlp-endpoint", "http://c:4318"][..],
            &[("OTEL_METRIC_EXPORT_INTERVAL", "soon")][..],
            "OTEL_METRIC_EXPORT_INTERVAL",
        ),
    ] {
        let (code, err) = run(args, envs);
        assert_eq!(code, Some(1), "{args:?} {envs:?}: {err}");
        assert!(err.contains(needle), "{args:?} {envs:?}: {err}");
    }
}

#[test]
fn pid_zero_is_rejected() {
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .args(["--pid", "0"])
        .output()
        .expect("gopulse");
    assert_eq!(out.status.code(), Some(2));
}

/// The Kubernetes API client up to its edge (no API server can run on the
/// test machine): a kubeconfig naming a server that does not answer is fatal
/// with `--kubernetes on`, and with `auto` the agent says so and serves
/// without pod names.
#[test]
fn an_unreachable_kubernetes_api_is_reported() {
    if !support::have_root() {
        return;
    }
    // A port nothing listens on: bind one, note it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let kubeconfig = dir.join(format!("kubeconfig-{}", std::process::id()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: u\n  user:\n    token: t\n\
             contexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n"
        ),
    )
    .unwrap();
    let kc = kubeconfig.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gopulse"))
        .args([
            "--kubernetes",
            "on",
            "--kubeconfig",
            kc,
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("gopulse");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "reaching the Kubernetes API at https://127.0.0.1:{port}"
        )),
        "{err}"
    );

    let mut agent = Agent::spawn_with(
        &[],
        &["--kubeconfig", kc, "--exe-regex", "^no-such-program$"],
    );
    let line = agent.wait_log("not pod names", Duration::from_secs(10));
    assert!(line.contains("reaching the Kubernetes API"), "{line}");
    assert_eq!(agent.get("/healthz").0, 200);
    agent.stop();
    let _ = std::fs::remove_file(&kubeconfig);
}

/// In a nested pid namespace (a container without `hostPID`) the probes
/// would report pids /proc there does not know: the agent refuses to start
/// and says what to do.
#[test]
fn a_nested_pid_namespace_is_refused() {
    if !support::have_root() {
        return;
    }
    let unshare = std::path::Path::new("/usr/bin/unshare");
    if !support::prerequisite(unshare.exists(), "unshare (util-linux) is not installed") {
        return;
    }
    let out = Command::new(unshare)
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_gopulse"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("hostPID: true"), "{err}");
}
