//! A live view of the registered members, fed by an etcd watch on a background thread.

use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::{
    connect, decode_member, next_backoff, request, runtime, split_key, DiscoveryError, EtcdConfig,
    Member, MIN_BACKOFF,
};

/// How many events a subscriber may fall behind before events are dropped for it.
pub const SUBSCRIBER_CAPACITY: usize = 1024;

/// A change in membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member appeared, or its record changed (e.g. a new endpoint).
    Joined(Member),
    /// A member's key disappeared: closed, expired, deleted or overwritten with garbage.
    Left { stage: String, instance: String },
}

/// The members registered under `{prefix}/stages/`, kept up to date by a watch.
///
/// Reads the current members when created, then follows every change. If the watch breaks
/// (etcd restarted, connection lost) it reads again and watches again with back-off, emitting
/// [`MemberEvent`]s for whatever changed meanwhile. Dropping it stops the background thread.
#[derive(Debug)]
pub struct Membership {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Membership {
    /// Reads the members under `cfg`'s prefix and starts watching it, from the revision after
    /// the read so that no change is missed.
    pub fn watch(cfg: &EtcdConfig) -> Result<Membership, DiscoveryError> {
        cfg.validate()?;
        let shared = Arc::new(Shared::default());
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let follower = Follower {
            cfg: cfg.clone(),
            prefix: cfg.stages_prefix(),
            shared: Arc::clone(&shared),
        };
        let thread = std::thread::Builder::new()
            .name("etcd-membership".to_string())
            .spawn(move || follower.run(stop_rx, ready_tx))
            .map_err(|e| DiscoveryError::Thread(format!("could not spawn: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Membership {
                shared,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(DiscoveryError::Thread(
                    "membership thread ended before its first read".to_string(),
                ))
            }
        }
    }

    /// The members of `stage`, sorted by instance.
    pub fn members(&self, stage: &str) -> Vec<Member> {
        self.shared
            .lock()
            .members
            .iter()
            .filter(|((s, _), _)| s == stage)
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Every member, sorted by stage then instance.
    pub fn all(&self) -> Vec<Member> {
        self.shared.lock().members.values().cloned().collect()
    }

    /// A stream of the changes from now on. Take [`members`](Self::members) after subscribing
    /// for a starting point. If the receiver falls [`SUBSCRIBER_CAPACITY`] events behind, further
    /// events are dropped for it (with a warning) until it catches up: resync from `members()`.
    pub fn subscribe(&self) -> Receiver<MemberEvent> {
        let (tx, rx) = crossbeam_channel::bounded(SUBSCRIBER_CAPACITY);
        self.shared.lock().subscribers.push(tx);
        rx
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("etcd membership thread panicked");
            }
        }
    }
}

/// State shared between the owner and the watching thread.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Keyed by (stage, instance), so iteration is sorted.
    members: BTreeMap<(String, String), Member>,
    subscribers: Vec<Sender<MemberEvent>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: each update is one map change.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn emit(&mut self, event: MemberEvent) {
        self.subscribers
            .retain(|tx| match tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(
                        ?event,
                        "membership subscriber is full; event dropped for it"
                    );
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
    }

    fn upsert(&mut self, member: Member) {
        let id = (member.stage.clone(), member.instance.clone());
        if self.members.get(&id) != Some(&member) {
            self.members.insert(id, member.clone());
            self.emit(MemberEvent::Joined(member));
        }
    }

    fn remove(&mut self, stage: String, instance: String) {
        if self
            .members
            .remove(&(stage.clone(), instance.clone()))
            .is_some()
        {
            self.emit(MemberEvent::Left { stage, instance });
        }
    }

    /// Replaces the whole map after a re-read, emitting the differences.
    fn replace(&mut self, fresh: BTreeMap<(String, String), Member>) {
        let gone: Vec<(String, String)> = self
            .members
            .keys()
            .filter(|id| !fresh.contains_key(*id))
            .cloned()
            .collect();
        for (stage, instance) in gone {
            self.remove(stage, instance);
        }
        for member in fresh.into_values() {
            self.upsert(member);
        }
    }
}

/// The background side: reads, watches, and repairs the watch.
struct Follower {
    cfg: EtcdConfig,
    prefix: String,
    shared: Arc<Shared>,
}

impl Follower {
    fn run(
        self,
        mut stop: watch::Receiver<bool>,
        ready: mpsc::SyncSender<Result<(), DiscoveryError>>,
    ) {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        rt.block_on(async move {
            let (client, revision) = match self.load().await {
                Ok((client, members, revision)) => {
                    self.shared.lock().members = members;
                    (client, revision)
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => {}
                () = self.follow(client, revision) => {}
            }
        });
    }

    /// Connects and reads every member, returning the revision the read saw.
    async fn load(
        &self,
    ) -> Result<(Client, BTreeMap<(String, String), Member>, i64), DiscoveryError> {
        let mut client = connect(&self.cfg).await?;
        let resp = request(
            "get",
            client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut members = BTreeMap::new();
        for kv in resp.kvs() {
            match decode_member(&self.prefix, kv.key(), kv.value()) {
                Ok(m) => {
                    members.insert((m.stage.clone(), m.instance.clone()), m);
                }
                Err(reason) => skip_warning(kv.key(), &reason),
            }
        }
        Ok((client, members, revision))
    }

    /// Watches from `revision + 1` forever, re-reading and re-watching when the watch breaks.
    async fn follow(&self, mut client: Client, mut revision: i64) {
        loop {
            let err = self.watch_from(&mut client, revision + 1).await;
            tracing::warn!(prefix = %self.prefix, error = %err,
                "etcd membership watch broke; reading members again");
            let mut backoff = MIN_BACKOFF;
            loop {
                tokio::time::sleep(backoff).await;
                match self.load().await {
                    Ok((fresh_client, members, fresh_revision)) => {
                        self.shared.lock().replace(members);
                        client = fresh_client;
                        revision = fresh_revision;
                        tracing::info!(prefix = %self.prefix, revision,
                            "etcd membership watch restored");
                        break;
                    }
                    Err(e) => {
                        backoff = next_backoff(backoff);
                        tracing::warn!(prefix = %self.prefix, error = %e,
                            retry_in_ms = backoff.as_millis() as u64,
                            "reading etcd members again failed");
                    }
                }
            }
        }
    }

    /// Applies watch events until the watch fails; returns why.
    async fn watch_from(&self, client: &mut Client, start: i64) -> DiscoveryError {
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let (_watcher, mut stream) =
            match request("watch", client.watch(self.prefix.as_str(), Some(options))).await {
                Ok(pair) => pair,
                Err(e) => return e,
            };
        let fail = |reason: String| DiscoveryError::Request {
            op: "watch",
            reason,
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return fail("stream closed by etcd".to_string()),
                Err(e) => return fail(e.to_string()),
            };
            if resp.canceled() || resp.compact_revision() > 0 {
                return fail(format!(
                    "watch canceled (compacted to {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                ));
            }
            let mut state = self.shared.lock();
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => match decode_member(&self.prefix, kv.key(), kv.value()) {
                        Ok(member) => state.upsert(member),
                        Err(reason) => {
                            skip_warning(kv.key(), &reason);
                            // Garbage over a member's key means that member is gone.
                            if let Ok((stage, instance)) = split_key(&self.prefix, kv.key()) {
                                state.remove(stage, instance);
                            }
                        }
                    },
                    EventType::Delete => {
                        if let Ok((stage, instance)) = split_key(&self.prefix, kv.key()) {
                            state.remove(stage, instance);
                        }
                    }
                }
            }
        }
    }
}

fn skip_warning(key: &[u8], reason: &str) {
    tracing::warn!(key = %String::from_utf8_lossy(key), reason, "skipping malformed etcd member entry");
}
