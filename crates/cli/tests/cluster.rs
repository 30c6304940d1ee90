//! `readstate run` on a real three-node Kafka cluster under broker faults (issue 26): the
//! leader of busy partitions killed with SIGKILL and restarted, a rolling restart of every
//! node, and the whole cluster gone for a minute. Each under at_least_once and
//! exactly_once_v2 (the outage under at_least_once only, so far: see the suite), with two
//! readstate instances and the embedded PostgreSQL sink, topics
//! replicated three times with `min.insync.replicas = 2`. The oracle, as the chaos test's:
//! output and changelog never regress, PostgreSQL equals the oracle, each (key, version)
//! is on the output once under exactly-once, and no instance needs a restart by hand.

mod support;

use readstate_testing::cluster::Cluster;
use readstate_testing::db::Db;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use readstate_testing::process::terminate_logged;
use std::time::{Duration, Instant};
use support::*;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL of the node leading partition 0 of the source, restarted 8 s later.
    LeaderKilled,
    /// Every node stopped (controlled shutdown) and started again, one after the other.
    RollingRestart,
    /// Every node killed, the cluster gone for 60 s, then started again.
    ClusterGone,
}

fn inject(cluster: &mut Cluster, fault: Fault, env: &Env) {
    match fault {
        Fault::LeaderKilled => {
            let leader = cluster.leader(&env.source, 0);
            eprintln!(
                "cluster: kill -9 node {leader}, the leader of {} [0]",
                env.source
            );
            cluster.kill(leader);
            // How long the node stays down, not a synchronisation.
            std::thread::sleep(Duration::from_secs(8));
            cluster.restart(leader);
        }
        Fault::RollingRestart => {
            for id in cluster.node_ids() {
                eprintln!("cluster: restart node {id}");
                cluster.stop(id);
                cluster.restart(id);
            }
        }
        Fault::ClusterGone => {
            eprintln!("cluster: every node killed for 60 s");
            cluster.kill_all();
            std::thread::sleep(Duration::from_secs(60));
            cluster.restart_all();
        }
    }
}

fn under_fault(cluster: &mut Cluster, fault: Fault, eos: bool, seed: u64) {
    let started = Instant::now();
    let mut env = Env::on(Broker::Cluster(cluster.bootstrap()), None);
    env.eos = eos;
    let db = Db::create();
    db.migrate();
    let events = zipf_workload(seed, 16_000);
    let want = oracle(&events);
    let file = env.state.path().join("topology.toml");
    let sink = "[[sink]]\nname = \"postgres\"\nkind = \"postgres\"\ninput = \"receipt-updates\"\nbatch_size = 200\nlinger = \"50ms\"\n";
    std::fs::write(&file, format!("{}\n{sink}", env.topology_text())).unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = ["--replication", "3", "--database-url", db.url.as_str()];
    let mut a = spawn_cli_in(&env, &file, dir_a.path(), &args);
    let mut b = spawn_cli_in(&env, &file, dir_b.path(), &args);
    let producer = kafka::produce_paced(env.brokers(), env.source.clone(), events.clone(), 100);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 50);
    inject(cluster, fault, &env);
    producer.join().unwrap();
    let (log_a, log_b) = (
        readstate_testing::process::log_in(dir_a.path()),
        readstate_testing::process::log_in(dir_b.path()),
    );
    wait_until_explained(
        "PostgreSQL to equal the oracle",
        Duration::from_secs(180),
        || {
            let rows = db.rows().unwrap_or_default();
            let equal = rows.len() == want.len()
                && want.iter().all(|(k, x)| {
                    rows.get(k)
                        .is_some_and(|r| r.seq == x.max_seq && r.version == x.advances)
                });
            equal.then_some(())
        },
        || format!("instance A:\n{}\ninstance B:\n{}", log_a(), log_b()),
    );
    let updates = env.read_updates(&want);
    for (child, name, dir) in [(&mut a, "A", dir_a.path()), (&mut b, "B", dir_b.path())] {
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "instance {name} stopped by itself ({exited:?}):\n{}",
            readstate_testing::process::log_in(dir)()
        );
        terminate_logged(child, name, readstate_testing::process::log_in(dir));
    }
    check_output_monotonic(&updates, &want);
    if eos {
        check_each_version_once(&updates);
    }
    let changelog = check_changelog_monotonic(&env);
    eprintln!(
        "cluster: {fault:?} under {}: PASS in {:?}: {} events, {} keys, {} output records and {changelog} changelog records without a regression; PostgreSQL equals the oracle",
        if eos { "exactly_once_v2" } else { "at_least_once" },
        started.elapsed(),
        events.len(),
        want.len(),
        updates.len(),
    );
}

/// One cluster for the whole suite (three JVMs are the machine's limit); the faults run
/// one after the other on it, each with its own application, topics and database.
#[test]
#[ignore = "not in scripts/test yet: a leader kill can expire an instance's output records (message.timeout.ms is the session timeout unless set) and stop it; after the cluster's outage a changelog still without a leader 10 s later stops an instance at its restore; run it with --ignored"]
fn real_cluster_survives_leader_kills_rolling_restarts_and_an_outage() {
    let mut cluster = Cluster::start(3);
    let faults = [
        Fault::LeaderKilled,
        Fault::RollingRestart,
        Fault::ClusterGone,
    ];
    for (i, fault) in faults.into_iter().enumerate() {
        for eos in [false, true] {
            if matches!(fault, Fault::ClusterGone) && eos {
                // Not yet: a commit_transaction that times out while the cluster is gone
                // is still in progress in librdkafka, and every later begin_transaction
                // is refused as conflicting (it must be called again until it completes).
                continue;
            }
            under_fault(&mut cluster, fault, eos, 90 + 2 * i as u64 + u64::from(eos));
        }
    }
}
