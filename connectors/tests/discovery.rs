//! Discovery against a real etcd (Debian's `etcd-server`), started per test by `EtcdServer`.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use omnistage_connectors::discovery::{
    DiscoveryError, EtcdConfig, EtcdServer, Member, MemberEvent, Membership, Registration,
};

/// Generous: the machine running the tests may be busy.
const EVENT_WAIT: Duration = Duration::from_secs(10);

fn config(server: &EtcdServer, ttl: Duration) -> EtcdConfig {
    // Logs from the background threads, shown for failing tests (filter with RUST_LOG).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "omnistage_connectors=debug".into()),
        )
        .with_test_writer()
        .try_init();
    EtcdConfig {
        endpoints: vec![server.endpoint()],
        prefix: "/omnistage/test".to_string(),
        lease_ttl: ttl,
    }
}

fn member(stage: &str, instance: &str, port: u16) -> Member {
    Member {
        stage: stage.to_string(),
        instance: instance.to_string(),
        endpoint: format!("127.0.0.1:{port}"),
    }
}

/// Waits for the next event, failing the test after `wait`.
fn next_event(rx: &Receiver<MemberEvent>, wait: Duration) -> MemberEvent {
    rx.recv_timeout(wait)
        .unwrap_or_else(|e| panic!("no membership event within {wait:?}: {e}"))
}

/// Polls `cond` until it holds, failing the test after `wait`.
fn eventually(wait: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Puts a raw value under a key with etcd-client directly.
fn put_raw(server: &EtcdServer, key: &str, value: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([server.endpoint()], None)
            .await
            .unwrap();
        client.put(key, value, None).await.unwrap();
    });
}

/// The lease a key is attached to (0 for none or no key).
fn lease_of(server: &EtcdServer, key: &str) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([server.endpoint()], None)
            .await
            .unwrap();
        let resp = client.get(key, None).await.unwrap();
        resp.kvs().first().map(|kv| kv.lease()).unwrap_or(0)
    })
}

#[test]
fn registered_members_are_listed_and_announced() {
    let server = EtcdServer::start().unwrap();
    let cfg = config(&server, Duration::from_secs(5));
    let membership = Membership::watch(&cfg).unwrap();
    let events = membership.subscribe();
    assert!(membership.all().is_empty());

    let b = Registration::register(&cfg, member("thinker", "b", 9002)).unwrap();
    let a = Registration::register(&cfg, member("thinker", "a", 9001)).unwrap();
    let t = Registration::register(&cfg, member("talker", "x", 9100)).unwrap();
    assert_eq!(a.key(), "/omnistage/test/stages/thinker/a");

    let mut joined = Vec::new();
    for _ in 0..3 {
        match next_event(&events, EVENT_WAIT) {
            MemberEvent::Joined(m) => joined.push(m),
            other => panic!("expected a join, got {other:?}"),
        }
    }
    assert_eq!(
        joined,
        vec![
            member("thinker", "b", 9002),
            member("thinker", "a", 9001),
            member("talker", "x", 9100)
        ]
    );
    assert_eq!(
        membership.members("thinker"),
        vec![member("thinker", "a", 9001), member("thinker", "b", 9002)]
    );
    assert_eq!(
        membership.members("talker"),
        vec![member("talker", "x", 9100)]
    );
    assert!(membership.members("vocoder").is_empty());
    assert_eq!(membership.all().len(), 3);
    drop((a, b, t));
}

#[test]
fn close_removes_the_key_at_once() {
    let server = EtcdServer::start().unwrap();
    // A long TTL: only the revocation can make the key go within the wait below.
    let cfg = config(&server, Duration::from_secs(60));
    let membership = Membership::watch(&cfg).unwrap();
    let events = membership.subscribe();
    let reg = Registration::register(&cfg, member("thinker", "a", 9001)).unwrap();
    assert_eq!(
        next_event(&events, EVENT_WAIT),
        MemberEvent::Joined(member("thinker", "a", 9001))
    );

    let closed_at = Instant::now();
    reg.close().unwrap();
    assert_eq!(
        next_event(&events, EVENT_WAIT),
        MemberEvent::Left {
            stage: "thinker".to_string(),
            instance: "a".to_string()
        }
    );
    // Far below the 60 s TTL: the lease was revoked, not left to expire.
    assert!(closed_at.elapsed() < Duration::from_secs(5));
    assert!(membership.members("thinker").is_empty());
}

#[test]
fn dropping_a_registration_also_revokes() {
    let server = EtcdServer::start().unwrap();
    let cfg = config(&server, Duration::from_secs(60));
    let membership = Membership::watch(&cfg).unwrap();
    let reg = Registration::register(&cfg, member("talker", "a", 9001)).unwrap();
    eventually(EVENT_WAIT, "the member to appear", || {
        membership.members("talker").len() == 1
    });
    drop(reg);
    eventually(EVENT_WAIT, "the member to leave", || {
        membership.members("talker").is_empty()
    });
}

#[test]
fn a_crashed_worker_drops_out_when_its_lease_expires() {
    let server = EtcdServer::start().unwrap();
    let cfg = config(&server, Duration::from_secs(1));
    let membership = Membership::watch(&cfg).unwrap();
    let events = membership.subscribe();
    let reg = Registration::register(&cfg, member("vocoder", "v0", 9300)).unwrap();
    assert_eq!(
        next_event(&events, EVENT_WAIT),
        MemberEvent::Joined(member("vocoder", "v0", 9300))
    );
    let lease = lease_of(&server, reg.key());
    assert_ne!(lease, 0);
    // Renewals keep it listed well past its TTL (etcd's minimum TTL is about 2 s), on the same
    // lease: renewed, not granted again.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(membership.members("vocoder").len(), 1);
    assert_eq!(lease_of(&server, reg.key()), lease);
    if let Ok(event) = events.try_recv() {
        panic!("no event expected while renewed, got {event:?}");
    }

    let crashed_at = Instant::now();
    reg.forget();
    assert_eq!(
        next_event(&events, EVENT_WAIT),
        MemberEvent::Left {
            stage: "vocoder".to_string(),
            instance: "v0".to_string()
        }
    );
    let gone_after = crashed_at.elapsed();
    // Not revoked: it took (about) the TTL to go.
    assert!(gone_after >= Duration::from_millis(500), "{gone_after:?}");
    assert!(membership.members("vocoder").is_empty());
}

#[test]
fn a_late_watcher_sees_existing_members() {
    let server = EtcdServer::start().unwrap();
    let cfg = config(&server, Duration::from_secs(5));
    let _a = Registration::register(&cfg, member("thinker", "a", 9001)).unwrap();
    let _b = Registration::register(&cfg, member("talker", "b", 9002)).unwrap();
    let membership = Membership::watch(&cfg).unwrap();
    assert_eq!(
        membership.all(),
        vec![member("talker", "b", 9002), member("thinker", "a", 9001)]
    );
    // Another deployment's prefix is invisible.
    let other = EtcdConfig {
        prefix: "/omnistage/other".to_string(),
        ..cfg.clone()
    };
    assert!(Membership::watch(&other).unwrap().all().is_empty());
}

#[test]
fn malformed_entries_are_skipped() {
    let server = EtcdServer::start().unwrap();
    let cfg = config(&server, Duration::from_secs(5));
    put_raw(&server, "/omnistage/test/stages/thinker/bad", "{not json");
    put_raw(&server, "/omnistage/test/stages/thinker", "{}");
    let membership = Membership::watch(&cfg).unwrap();
    assert!(membership.all().is_empty());

    let events = membership.subscribe();
    put_raw(&server, "/omnistage/test/stages/talker/bad", "\u{1}garbage");
    put_raw(
        &server,
        "/omnistage/test/stages/talker/liar",
        r#"{"stage":"talker","instance":"someone-else","endpoint":"h:1"}"#,
    );
    let _good = Registration::register(&cfg, member("talker", "ok", 9005)).unwrap();
    // The garbage produced nothing; the good member still arrives.
    assert_eq!(
        next_event(&events, EVENT_WAIT),
        MemberEvent::Joined(member("talker", "ok", 9005))
    );
    assert_eq!(membership.all(), vec![member("talker", "ok", 9005)]);

    // Garbage written over a live member's key makes it leave.
    put_raw(&server, "/omnistage/test/stages/talker/ok", "[]");
    assert_eq!(
        next_event(&events, EVENT_WAIT),
        MemberEvent::Left {
            stage: "talker".to_string(),
            instance: "ok".to_string()
        }
    );
}

#[test]
fn unreachable_etcd_fails_with_the_endpoint_named() {
    // Nothing listens on a port that was just free.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = EtcdConfig {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        prefix: "/omnistage/test".to_string(),
        lease_ttl: Duration::from_secs(5),
    };
    let started = Instant::now();
    let err = Registration::register(&cfg, member("thinker", "a", 9001)).unwrap_err();
    assert!(matches!(err, DiscoveryError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    let err = Membership::watch(&cfg).unwrap_err();
    assert!(matches!(err, DiscoveryError::Connect { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn bad_members_are_refused_before_touching_etcd() {
    let cfg = EtcdConfig {
        endpoints: vec!["http://127.0.0.1:1".to_string()],
        prefix: "/omnistage/test".to_string(),
        lease_ttl: Duration::from_secs(5),
    };
    for bad in [
        member("", "a", 1),
        member("a/b", "c", 1),
        member("s", "i/j", 1),
    ] {
        let err = Registration::register(&cfg, bad).unwrap_err();
        assert!(matches!(err, DiscoveryError::InvalidMember(_)), "{err:?}");
    }
}

/// Waits for an event matching `want`, passing over others, failing the test after `wait`.
fn wait_for_event(rx: &Receiver<MemberEvent>, wait: Duration, want: &MemberEvent) {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(event) if &event == want => return,
            Ok(_) => {}
            Err(e) => panic!("no {want:?} within {wait:?}: {e}"),
        }
    }
}

#[test]
fn registrations_and_watches_survive_an_etcd_restart() {
    let mut server = EtcdServer::start().unwrap();
    let ttl = Duration::from_secs(2);
    let cfg = config(&server, ttl);
    let membership = Membership::watch(&cfg).unwrap();
    let events = membership.subscribe();
    let a = Registration::register(&cfg, member("thinker", "a", 9001)).unwrap();
    wait_for_event(
        &events,
        EVENT_WAIT,
        &MemberEvent::Joined(member("thinker", "a", 9001)),
    );

    server.restart().unwrap();

    // The watch is back: a member registered after the restart is announced.
    let _b = Registration::register(&cfg, member("thinker", "b", 9002)).unwrap();
    wait_for_event(
        &events,
        Duration::from_secs(20),
        &MemberEvent::Joined(member("thinker", "b", 9002)),
    );
    let both = vec![member("thinker", "a", 9001), member("thinker", "b", 9002)];
    eventually(Duration::from_secs(20), "both members listed", || {
        membership.members("thinker") == both
    });
    // `a` renews its (new) lease: still listed well past the old lease's TTL.
    std::thread::sleep(ttl * 3);
    assert_eq!(membership.members("thinker"), both);

    a.close().unwrap();
    wait_for_event(
        &events,
        EVENT_WAIT,
        &MemberEvent::Left {
            stage: "thinker".to_string(),
            instance: "a".to_string(),
        },
    );
}
