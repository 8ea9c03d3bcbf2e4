//! The Kubernetes manifests in `deploy/kubernetes`, checked with the tools
//! `cargo xtask setup` installs: every kustomization (the base and each
//! overlay) is rendered by kubectl's kustomize, validated against the API
//! schemas of Kubernetes 1.30 to 1.37 (kubernetes-validate, strict: an
//! unknown field is an error) and scanned by checkov, whose findings must
//! be exactly those `deploy/README.md` lists and explains (a new finding
//! fails, and so does a listed one that is gone). The rendered objects are
//! also checked for what the agent needs (hostPID, the capability list the
//! `least_privilege` test proves, probes, the pod RBAC), and the image
//! recipe for the same capabilities.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use serde_json::Value;

/// The Kubernetes releases the manifests must be valid for.
const KUBERNETES_VERSIONS: &[&str] = &[
    "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];

/// Kinds kubernetes-validate has no schema for (custom resources).
const WITHOUT_SCHEMA: &[&str] = &["ServiceMonitor"];

struct Tools {
    kubectl: PathBuf,
    validate: PathBuf,
    checkov: PathBuf,
}

fn tools() -> Option<Tools> {
    let kubectl = support::kubectl_binary();
    let validate =
        support::python_tool_dir("kubernetes-validate", support::KUBERNETES_VALIDATE_VERSION);
    let checkov = support::python_tool_dir("checkov", support::CHECKOV_VERSION);
    let ok = support::prerequisite(
        kubectl.is_some() && validate.is_some() && checkov.is_some(),
        "kubectl, kubernetes-validate or checkov is not installed (cargo xtask setup)",
    );
    ok.then(|| Tools {
        kubectl: kubectl.unwrap(),
        validate: validate.unwrap(),
        checkov: checkov.unwrap(),
    })
}

/// `base` and every overlay, by name, with their directories.
fn kustomizations() -> Vec<(String, PathBuf)> {
    let root = support::deploy_dir().join("kubernetes");
    let mut all = vec![("base".to_owned(), root.join("base"))];
    let mut overlays: Vec<(String, PathBuf)> = std::fs::read_dir(root.join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    overlays.sort();
    all.extend(overlays);
    all
}

fn render(kubectl: &Path, dir: &Path) -> String {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The YAML documents as JSON, parsed by PyYAML (kubernetes-validate's).
fn parse_yaml(validate_dir: &Path, yaml: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .env("PYTHONPATH", validate_dir)
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "PyYAML could not parse the rendering");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// kubernetes-validate of `files` for one Kubernetes release: `Err` with
/// its report on any schema error, or a resource without a schema that is
/// not a known custom resource.
fn validate(validate_dir: &Path, version: &str, files: &[PathBuf]) -> Result<(), String> {
    let out = Command::new("python3")
        .env("PYTHONPATH", validate_dir)
        .args(["-m", "kubernetes_validate", "--strict", "-k", version])
        .args(files)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(report);
    }
    // A resource it has no schema for passes with a warning.
    for line in report
        .lines()
        .filter(|l| l.contains("Couldn't find schema"))
    {
        if !WITHOUT_SCHEMA
            .iter()
            .any(|kind| line.contains(&format!("kind {kind} ")))
        {
            return Err(format!("not validated: {line}"));
        }
    }
    Ok(())
}

/// checkov's failed checks by file stem (the kustomization's name).
fn checkov(checkov_dir: &Path, dir: &Path, names: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut cmd = Command::new("python3");
    cmd.current_dir(dir)
        .env("PYTHONPATH", checkov_dir)
        .arg(checkov_dir.join("bin/checkov"))
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "--soft-fail",
        ])
        .args(["--quiet", "--compact", "--output", "json"]);
    for name in names {
        cmd.arg("--file").arg(format!("{name}.yaml"));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "checkov: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    // One report per framework: an object, or a list of them.
    let reports = match report {
        Value::Array(v) => v,
        one => vec![one],
    };
    let mut found: BTreeMap<String, BTreeSet<String>> = names
        .iter()
        .map(|n| (n.to_string(), BTreeSet::new()))
        .collect();
    for r in &reports {
        assert_eq!(
            r["summary"]["parsing_errors"].as_u64(),
            Some(0),
            "checkov could not parse the manifests"
        );
        for f in r["results"]["failed_checks"].as_array().unwrap() {
            let file = f["file_path"].as_str().unwrap();
            let stem = Path::new(file).file_stem().unwrap().to_string_lossy();
            found
                .get_mut(stem.as_ref())
                .unwrap_or_else(|| panic!("checkov reports a file {file}"))
                .insert(f["check_id"].as_str().unwrap().to_owned());
        }
    }
    found
}

/// The findings deploy/README.md explains, by check id: the rows of the
/// table under "## Checkov findings", `| CKV_K8S_17 | all | why |` (or a
/// comma-separated list of kustomizations instead of `all`).
fn listed_findings(readme: &str) -> BTreeMap<String, Vec<String>> {
    let section = readme
        .split("\n## Checkov findings")
        .nth(1)
        .expect("deploy/README.md has a \"## Checkov findings\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let id = cells.get(1)?.trim_matches('`');
            (id.starts_with("CKV")).then(|| {
                let scope = cells.get(2).expect("a scope column");
                (
                    id.to_owned(),
                    scope.split(',').map(|s| s.trim().to_owned()).collect(),
                )
            })
        })
        .collect()
}

/// The listed findings of one kustomization.
fn expected(listed: &BTreeMap<String, Vec<String>>, name: &str) -> BTreeSet<String> {
    listed
        .iter()
        .filter(|(_, scope)| scope.iter().any(|s| s == "all" || s == name))
        .map(|(id, _)| id.clone())
        .collect()
}

/// `Err` naming each finding not explained and each explained one gone.
fn compare(
    name: &str,
    found: &BTreeSet<String>,
    expected: &BTreeSet<String>,
) -> Result<(), String> {
    let new: Vec<&String> = found.difference(expected).collect();
    let gone: Vec<&String> = expected.difference(found).collect();
    if new.is_empty() && gone.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{name}: checkov findings not explained in deploy/README.md: {new:?}; explained \
             there but no longer found: {gone:?}"
        ))
    }
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = kind(docs, k);
    assert_eq!(found.len(), 1, "one {k}");
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// What the agent needs of its DaemonSet, in every kustomization.
fn check_objects(name: &str, docs: &[Value], caps: &[String]) {
    for d in docs {
        let namespaced = !matches!(
            d["kind"].as_str(),
            Some("Namespace" | "ClusterRole" | "ClusterRoleBinding" | "PriorityClass")
        );
        if namespaced {
            assert_eq!(d["metadata"]["namespace"], "gopulse", "{name}: {d}");
        }
    }
    let ds = one(docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "{name}: hostPID");
    for host in ["hostNetwork", "hostIPC"] {
        assert_ne!(pod[host], true, "{name}: {host}");
    }
    assert!(pod["volumes"].is_null(), "{name}: the agent mounts nothing");
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
    // The base's list everywhere; `cap-sys-admin` (kernels without
    // uprobe_multi links) adds CAP_SYS_ADMIN for perf-event uprobes.
    let mut want = caps.to_vec();
    if name == "cap-sys-admin" {
        want.push("SYS_ADMIN".to_owned());
    }
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        want,
        "{name}: the capabilities, parsed as YAML, differ from what support::daemonset_capabilities reads"
    );
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(strings(&c["args"]).contains(&"--listen=0.0.0.0:9464".to_owned()));
    let env = c["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "{name}: NODE_NAME from the downward API"
    );
    assert_eq!(c["ports"][0]["containerPort"], 9464);
    assert_eq!(c["ports"][0]["name"], "metrics");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{name}: {probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics");
    }
    for bound in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                c["resources"][bound][res].is_string(),
                "{name}: {bound}.{res}"
            );
        }
    }
    let role = one(docs, "ClusterRole");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]),
        "{name}: the agent reads pods, nothing else"
    );
    let binding = one(docs, "ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);

    let services = kind(docs, "Service");
    match name {
        "otlp" => {
            assert!(strings(&c["args"]).contains(&"--no-prometheus".to_owned()));
            assert!(
                env.iter()
                    .any(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
            );
            assert!(services.is_empty(), "otlp: no /metrics, no Service");
        }
        _ => {
            let svc = services.first().expect("the headless Service");
            assert_eq!(svc["spec"]["clusterIP"], "None");
            assert_eq!(svc["spec"]["ports"][0]["port"], 9464);
            let labels = &ds["spec"]["template"]["metadata"]["labels"];
            for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
                assert_eq!(
                    &labels[k], v,
                    "{name}: the Service selects the agent's pods"
                );
            }
        }
    }
    if name == "prometheus-operator" {
        let sm = one(docs, "ServiceMonitor");
        assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
        let svc_labels = &services[0]["metadata"]["labels"];
        for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&svc_labels[k], v, "the ServiceMonitor selects the Service");
        }
    }
    let user = if matches!(name, "run-as-root" | "cap-sys-admin") {
        0
    } else {
        65534
    };
    assert_eq!(sc["runAsUser"], user, "{name}");
    assert_eq!(sc["runAsNonRoot"], user != 0, "{name}");
}

/// The image gives its binary the DaemonSet's capabilities as file
/// capabilities, no more, no fewer.
fn check_dockerfile(caps: &[String]) {
    let path = support::deploy_dir().join("image/Dockerfile");
    let text = std::fs::read_to_string(&path).unwrap();
    let setcap = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("RUN setcap "))
        .expect("a `RUN setcap` line in deploy/image/Dockerfile");
    let (list, _) = setcap.split_once("=ep").expect("setcap CAPS=ep FILE");
    let file_caps: BTreeSet<String> = list.split(',').map(|c| c.trim().to_owned()).collect();
    let want: BTreeSet<String> = caps
        .iter()
        .map(|c| format!("cap_{}", c.to_ascii_lowercase()))
        .collect();
    assert_eq!(
        file_caps, want,
        "file capabilities in the Dockerfile vs the DaemonSet"
    );
}

#[test]
fn manifests_render_validate_and_pass_the_scan() {
    let Some(tools) = tools() else {
        return;
    };
    let started = Instant::now();
    let caps = support::daemonset_capabilities();
    check_dockerfile(&caps);

    let out = std::env::temp_dir().join(format!("gopulse-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let mut names = Vec::new();
    let mut files = Vec::new();
    for (name, dir) in kustomizations() {
        let yaml = render(&tools.kubectl, &dir);
        let docs = parse_yaml(&tools.validate, &yaml);
        check_objects(&name, &docs, &caps);
        let file = out.join(format!("{name}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        names.push(name);
        files.push(file);
    }
    assert!(names.len() >= 5, "base and four overlays: {names:?}");

    for version in KUBERNETES_VERSIONS {
        if let Err(report) = validate(&tools.validate, version, &files) {
            panic!("Kubernetes {version}: {report}");
        }
    }
    eprintln!(
        "RESULT {} kustomizations valid for Kubernetes {} to {}",
        names.len(),
        KUBERNETES_VERSIONS[0],
        KUBERNETES_VERSIONS[KUBERNETES_VERSIONS.len() - 1]
    );

    // A canary proves the two checks bite: the base with a misspelt field
    // must fail validation, and with a writable root filesystem must bring
    // a finding the README does not explain.
    let base = std::fs::read_to_string(&files[0]).unwrap();
    assert!(base.contains("readOnlyRootFilesystem: true"));
    let typo = out.join("typo.yaml");
    std::fs::write(
        &typo,
        base.replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"),
    )
    .unwrap();
    assert!(
        validate(&tools.validate, KUBERNETES_VERSIONS[0], &[typo]).is_err(),
        "kubernetes-validate accepted a misspelt field"
    );
    std::fs::write(
        out.join("canary.yaml"),
        base.replace(
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
        ),
    )
    .unwrap();

    let readme = std::fs::read_to_string(support::deploy_dir().join("README.md")).unwrap();
    let listed = listed_findings(&readme);
    assert!(!listed.is_empty(), "no findings listed in deploy/README.md");
    for (id, scope) in &listed {
        for s in scope {
            assert!(
                s == "all" || names.contains(s),
                "{id} is listed for {s}, which is no kustomization here"
            );
        }
    }
    let mut scanned: Vec<&str> = names.iter().map(String::as_str).collect();
    scanned.push("canary");
    let found = checkov(&tools.checkov, &out, &scanned);
    assert!(
        compare("canary", &found["canary"], &expected(&listed, "base")).is_err(),
        "the canary's writable root filesystem went unnoticed: {:?}",
        found["canary"]
    );
    let failures: Vec<String> = names
        .iter()
        .filter_map(|n| compare(n, &found[n], &expected(&listed, n)).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for n in &names {
        eprintln!(
            "RESULT checkov {n}: {:?}, each explained in deploy/README.md",
            found[n]
        );
    }
    let _ = std::fs::remove_dir_all(&out);
    eprintln!(
        "RESULT deploy manifests checked in {:.1?}",
        started.elapsed()
    );
}
