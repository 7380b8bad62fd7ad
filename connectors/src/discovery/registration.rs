//! A worker's entry in etcd, kept alive from a background thread.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::watch;

use super::{
    connect, encode_member, next_backoff, request, runtime, DiscoveryError, EtcdConfig, Member,
    CONNECT_TIMEOUT, MIN_BACKOFF,
};

/// How a registration ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Revoke the lease: the key disappears at once.
    Revoke,
    /// Stop renewing only: the key expires after the lease TTL, as if the worker crashed.
    Forget,
}

/// A member registered in etcd under a lease that a background thread keeps alive.
///
/// [`close`](Self::close) or dropping it revokes the lease, so the key disappears at once;
/// [`forget`](Self::forget) only stops the renewals, so the key expires after the TTL.
#[derive(Debug)]
pub struct Registration {
    member: Member,
    key: String,
    stop: watch::Sender<Option<Stop>>,
    thread: Option<JoinHandle<Result<(), DiscoveryError>>>,
}

impl Registration {
    /// Grants a lease of `cfg.lease_ttl`, puts `member`'s key with it, and keeps the lease alive
    /// (every third of the TTL) until closed. A lost lease (etcd restarted, renewals failed) is
    /// granted again and the key put again, with back-off.
    pub fn register(cfg: &EtcdConfig, member: Member) -> Result<Registration, DiscoveryError> {
        cfg.validate()?;
        member.validate()?;
        let key = cfg.member_key(&member.stage, &member.instance);
        let (stop, stop_rx) = watch::channel(None);
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let keeper = Keeper {
            cfg: cfg.clone(),
            key: key.clone(),
            value: encode_member(&member),
        };
        let thread = std::thread::Builder::new()
            .name(format!("etcd-reg-{}-{}", member.stage, member.instance))
            .spawn(move || keeper.run(stop_rx, ready_tx))
            .map_err(|e| DiscoveryError::Thread(format!("could not spawn: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Registration {
                member,
                key,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(join_error(thread.join())),
        }
    }

    /// The member this registration announces.
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// The etcd key this registration holds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Revokes the lease, so the key disappears at once, and stops the background thread.
    pub fn close(mut self) -> Result<(), DiscoveryError> {
        self.finish(Stop::Revoke)
    }

    /// Stops renewing the lease without revoking it, as a crashed worker would: the key stays
    /// until the lease TTL runs out. For tests and crash drills.
    pub fn forget(mut self) {
        if let Err(e) = self.finish(Stop::Forget) {
            tracing::warn!(key = %self.key, error = %e, "stopping etcd registration failed");
        }
    }

    fn finish(&mut self, how: Stop) -> Result<(), DiscoveryError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // The thread owns the receiver until it returns; if it already ended, so be it.
        let _ = self.stop.send(Some(how));
        match thread.join() {
            Ok(result) => result,
            Err(_) => Err(DiscoveryError::Thread(
                "registration thread panicked".to_string(),
            )),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = self.finish(Stop::Revoke) {
            tracing::warn!(key = %self.key, error = %e, "revoking etcd registration on drop failed");
        }
    }
}

fn join_error(joined: std::thread::Result<Result<(), DiscoveryError>>) -> DiscoveryError {
    match joined {
        Ok(Err(e)) => e,
        Ok(Ok(())) => DiscoveryError::Thread("registration thread ended early".to_string()),
        Err(_) => DiscoveryError::Thread("registration thread panicked".to_string()),
    }
}

/// What the background thread needs to (re)create the key.
struct Keeper {
    cfg: EtcdConfig,
    key: String,
    value: String,
}

/// The lease currently holding the key.
struct Held {
    client: Client,
    lease: i64,
    /// The TTL etcd granted, which may be longer than the one asked for.
    ttl: Duration,
}

impl Keeper {
    fn run(
        self,
        mut stop: watch::Receiver<Option<Stop>>,
        ready: mpsc::SyncSender<Result<(), DiscoveryError>>,
    ) -> Result<(), DiscoveryError> {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(e.clone()));
                return Err(e);
            }
        };
        rt.block_on(async move {
            let mut held = match self.acquire().await {
                Ok(held) => held,
                Err(e) => {
                    let _ = ready.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let _ = ready.send(Ok(()));
            let how = tokio::select! {
                how = wait_stop(&mut stop) => how,
                () = self.maintain(&mut held) => Stop::Revoke,
            };
            match how {
                Stop::Forget => Ok(()),
                Stop::Revoke => {
                    let lease = held.lease;
                    request("lease revoke", held.client.lease_revoke(lease))
                        .await
                        .map(|_| ())
                }
            }
        })
    }

    /// Connects, grants a lease and puts the key with it.
    async fn acquire(&self) -> Result<Held, DiscoveryError> {
        let mut client = connect(&self.cfg).await?;
        let ttl_secs = i64::try_from(self.cfg.lease_ttl.as_secs_f64().ceil() as u64)
            .unwrap_or(i64::MAX)
            .max(1);
        let grant = request("lease grant", client.lease_grant(ttl_secs, None)).await?;
        let lease = grant.id();
        let ttl = Duration::from_secs(grant.ttl().max(1).unsigned_abs());
        let put = request(
            "put",
            client.put(
                self.key.as_str(),
                self.value.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await;
        if let Err(e) = put {
            // Best effort: the lease would expire by itself anyway.
            let _ = request("lease revoke", client.lease_revoke(lease)).await;
            return Err(e);
        }
        tracing::debug!(key = %self.key, lease, ttl_s = ttl.as_secs(), "registered in etcd");
        Ok(Held { client, lease, ttl })
    }

    /// Renews the lease forever; when renewing fails, acquires a new one with back-off.
    async fn maintain(&self, held: &mut Held) {
        loop {
            let err = match keep_alive(held).await {
                Ok(never) => match never {},
                Err(e) => e,
            };
            tracing::warn!(key = %self.key, lease = held.lease, error = %err,
                "etcd lease renewal failed; registering again");
            let mut backoff = MIN_BACKOFF;
            loop {
                tokio::time::sleep(backoff).await;
                match self.acquire().await {
                    Ok(new) => {
                        tracing::info!(key = %self.key, lease = new.lease,
                            "registered in etcd again after renewals failed");
                        *held = new;
                        break;
                    }
                    Err(e) => {
                        backoff = next_backoff(backoff);
                        tracing::warn!(key = %self.key, error = %e,
                            retry_in_ms = backoff.as_millis() as u64,
                            "registering in etcd again failed");
                    }
                }
            }
        }
    }
}

/// Renews `held`'s lease every third of its TTL until a renewal fails.
async fn keep_alive(held: &mut Held) -> Result<std::convert::Infallible, DiscoveryError> {
    let lease = held.lease;
    let (mut keeper, mut stream) =
        request("lease keep-alive", held.client.lease_keep_alive(lease)).await?;
    // Opening the stream sent the first renewal and etcd-client read its answer (and checked
    // that the lease still lives), so the stream holds only later answers.
    let wait = held.ttl.clamp(Duration::from_secs(1), CONNECT_TIMEOUT);
    let period = (held.ttl / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        renew(&mut keeper).await?;
        expect_renewed(&mut stream, lease, wait).await?;
    }
}

async fn renew(keeper: &mut LeaseKeeper) -> Result<(), DiscoveryError> {
    keeper
        .keep_alive()
        .await
        .map_err(|e| DiscoveryError::Request {
            op: "lease keep-alive",
            reason: e.to_string(),
        })
}

/// Reads the answer to one renewal, which must come within `wait` and keep the lease.
async fn expect_renewed(
    stream: &mut LeaseKeepAliveStream,
    lease: i64,
    wait: Duration,
) -> Result<(), DiscoveryError> {
    let fail = |reason: String| DiscoveryError::Request {
        op: "lease keep-alive",
        reason,
    };
    match tokio::time::timeout(wait, stream.message()).await {
        Err(_) => Err(fail("no answer in time".to_string())),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Ok(Ok(None)) => Err(fail("stream closed by etcd".to_string())),
        Ok(Ok(Some(resp))) if resp.ttl() <= 0 => {
            Err(fail(format!("lease {lease:x} expired or was revoked")))
        }
        Ok(Ok(Some(_))) => Ok(()),
    }
}

/// Waits for the owner to say how to stop; an owner gone without a word means revoke.
async fn wait_stop(stop: &mut watch::Receiver<Option<Stop>>) -> Stop {
    loop {
        if let Some(how) = *stop.borrow_and_update() {
            return how;
        }
        if stop.changed().await.is_err() {
            return (*stop.borrow()).unwrap_or(Stop::Revoke);
        }
    }
}
