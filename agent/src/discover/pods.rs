//! Pod names for processes in Kubernetes pods: the cgroup path gives the
//! pod UID and the container id; the Kubernetes API (this node's pods only,
//! kept by a kube-rs reflector) gives the namespace, the pod's name and the
//! container's. Names arrive after the process starts (the kubelet reports
//! a container's id once it runs), so a process's series carry them from
//! the first scrape after they are known.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, Weak},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, reflector, watcher},
};

use crate::metrics::LabelChoice;

/// What the API says about a process's pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub pod: String,
    /// The container's name, once the kubelet has reported its id.
    pub container: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// The pod names of one process, filled in when known; shared by the
/// process's series labels.
#[derive(Debug)]
pub struct PodNames {
    show: LabelChoice,
    meta: RwLock<Option<PodMeta>>,
}

impl PodNames {
    pub fn new(show: LabelChoice) -> Self {
        Self {
            show,
            meta: RwLock::new(None),
        }
    }

    /// The name labels to put on series now (none until the pod is known).
    pub fn labels(&self) -> Vec<(&'static str, String)> {
        let meta = self.meta.read().unwrap_or_else(|e| e.into_inner());
        let Some(m) = meta.as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(3);
        if self.show.namespace {
            out.push(("namespace", m.namespace.clone()));
        }
        if self.show.pod {
            out.push(("pod", m.pod.clone()));
        }
        if self.show.container
            && let Some(c) = &m.container
        {
            out.push(("container", c.clone()));
        }
        out
    }

    fn set(&self, meta: PodMeta) {
        *self.meta.write().unwrap_or_else(|e| e.into_inner()) = Some(meta);
    }

    pub fn get(&self) -> Option<PodMeta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The pod with this UID, and the name of the container with this id, from
/// a pod object as the API returns it.
pub fn meta_of(pod: &Pod, container_id: Option<&str>) -> PodMeta {
    let container = container_id.and_then(|id| {
        let status = pod.status.as_ref()?;
        [
            status.container_statuses.as_ref(),
            status.init_container_statuses.as_ref(),
            status.ephemeral_container_statuses.as_ref(),
        ]
        .into_iter()
        .flatten()
        .flatten()
        .find(|c| {
            // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
            c.container_id
                .as_deref()
                .and_then(|s| s.rsplit_once("://"))
                .is_some_and(|(_, cid)| cid == id)
        })
        .map(|c| c.name.clone())
    });
    PodMeta {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        pod: pod.metadata.name.clone().unwrap_or_default(),
        container,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    }
}

/// How long a process whose pod is known waits for its container's name
/// before its series are named without it.
const CONTAINER_GRACE: Duration = Duration::from_secs(30);

struct Pending {
    names: Weak<PodNames>,
    pod_uid: String,
    container_id: Option<String>,
    since: Instant,
}

/// This node's pods, watched through the Kubernetes API.
#[derive(Clone)]
pub struct PodDirectory {
    store: reflector::Store<Pod>,
    pending: Arc<Mutex<Vec<Pending>>>,
}

/// Where to reach the API (`--kubeconfig`, else in-cluster).
pub struct ApiAccess {
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: only its pods are watched.
    pub node: String,
}

impl PodDirectory {
    /// Connects, starts watching this node's pods (on the current tokio
    /// runtime) and names pending processes as pods appear. Returns before
    /// the first list has arrived.
    pub async fn start(access: ApiAccess) -> anyhow::Result<Self> {
        let config = match &access.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
            None => Config::incluster().context(
                "no Kubernetes API: not in a pod with a service account (give --kubeconfig)",
            )?,
        };
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).context("Kubernetes API client")?;
        // Fail now, with the reason, rather than warn from the watcher later.
        let version = tokio::time::timeout(Duration::from_secs(5), client.apiserver_version())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 5 s"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .with_context(|| format!("reaching the Kubernetes API at {server}"))?;
        tracing::info!(server, version = %version.git_version, "Kubernetes API reachable");
        let pods: Api<Pod> = Api::all(client);
        let (store, writer) = reflector::store();
        let selector = format!("spec.nodeName={}", access.node);
        let stream = reflector(
            writer,
            watcher(pods, watcher::Config::default().fields(&selector)),
        )
        .default_backoff()
        .touched_objects();
        let dir = Self {
            store,
            pending: Arc::new(Mutex::new(Vec::new())),
        };
        let resolver = dir.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut errors = 0u64;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => resolver.resolve(),
                    Err(e) => {
                        errors += 1;
                        // The watcher retries with backoff; say so now and then.
                        if errors.is_power_of_two() {
                            tracing::warn!(errors, "watching this node's pods: {e}");
                        }
                    }
                }
            }
        });
        let periodic = dir.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                periodic.resolve();
            }
        });
        tracing::info!(node = %access.node, "watching this node's pods through the Kubernetes API");
        Ok(dir)
    }

    /// Waits until the first list of this node's pods has arrived, or
    /// `timeout` (then lookups find only what has arrived; a warning says
    /// so).
    pub async fn wait_ready(&self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.store.wait_until_ready())
            .await
            .is_err()
        {
            tracing::warn!(
                "no list of this node's pods from the Kubernetes API within {timeout:?}; \
                 selecting by pod finds pods as they arrive"
            );
        }
    }

    /// Names `names` when the pod is known (now or later).
    pub fn name(&self, names: &Arc<PodNames>, pod_uid: &str, container_id: Option<&str>) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Pending {
                names: Arc::downgrade(names),
                pod_uid: pod_uid.to_owned(),
                container_id: container_id.map(str::to_owned),
                since: Instant::now(),
            });
        self.resolve();
    }

    /// The pod with this UID, if the API has shown it.
    pub fn lookup(&self, pod_uid: &str, container_id: Option<&str>) -> Option<PodMeta> {
        self.store
            .find(|p| p.metadata.uid.as_deref() == Some(pod_uid))
            .map(|p| meta_of(&p, container_id))
    }

    /// Names every pending process whose pod and container are known, or
    /// whose pod is known and whose grace for the container has passed.
    fn resolve(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|p| {
            let Some(names) = p.names.upgrade() else {
                return false; // the process is gone
            };
            match self.lookup(&p.pod_uid, p.container_id.as_deref()) {
                Some(meta) if meta.container.is_some() || p.since.elapsed() >= CONTAINER_GRACE => {
                    names.set(meta);
                    false
                }
                _ => true,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn names_the_pod_and_the_container_by_id() {
        let id = "a".repeat(64);
        let p = pod(serde_json::json!({
            "metadata": {"name": "api-7d9", "namespace": "shop", "uid": "0b1c",
                         "labels": {"app": "api"}},
            "status": {"containerStatuses": [
                {"name": "sidecar", "containerID": format!("containerd://{}", "b".repeat(64)),
                 "image": "", "imageID": "", "ready": true, "restartCount": 0},
                {"name": "api", "containerID": format!("containerd://{id}"),
                 "image": "", "imageID": "", "ready": true, "restartCount": 0}
            ]}
        }));
        let m = meta_of(&p, Some(&id));
        assert_eq!(m.namespace, "shop");
        assert_eq!(m.pod, "api-7d9");
        assert_eq!(m.container.as_deref(), Some("api"));
        assert_eq!(m.labels.get("app").map(String::as_str), Some("api"));
        // A container the kubelet has not reported yet: the pod only.
        assert_eq!(meta_of(&p, Some(&"c".repeat(64))).container, None);
        assert_eq!(meta_of(&p, None).container, None);
    }

    #[test]
    fn init_containers_and_cri_o_ids() {
        let id = "d".repeat(64);
        let p = pod(serde_json::json!({
            "metadata": {"name": "job", "namespace": "batch"},
            "status": {"initContainerStatuses": [
                {"name": "migrate", "containerID": format!("cri-o://{id}"),
                 "image": "", "imageID": "", "ready": false, "restartCount": 0}
            ]}
        }));
        assert_eq!(meta_of(&p, Some(&id)).container.as_deref(), Some("migrate"));
    }

    #[test]
    fn labels_follow_the_choice_and_appear_once_known() {
        let all = LabelChoice::parse(LabelChoice::ALL).unwrap();
        let n = PodNames::new(all);
        assert!(n.labels().is_empty());
        n.set(PodMeta {
            namespace: "shop".into(),
            pod: "api-7d9".into(),
            container: Some("api".into()),
            labels: BTreeMap::new(),
        });
        assert_eq!(
            n.labels(),
            [
                ("namespace", "shop".to_owned()),
                ("pod", "api-7d9".to_owned()),
                ("container", "api".to_owned())
            ]
        );
        let some = PodNames::new(LabelChoice::parse("pod").unwrap());
        some.set(n.get().unwrap());
        assert_eq!(some.labels(), [("pod", "api-7d9".to_owned())]);
    }
}
