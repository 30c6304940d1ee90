//! `readstate run`: exactly_once_v2 on the real broker: a zombie fenced, and kill -9 between produce and commit.

mod support;

use process::terminate;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use readstate_testing::process;
use std::time::Duration;
use support::*;

// ---- exactly_once_v2 on the real broker.

/// An instance SIGSTOPped past its session timeout under exactly_once_v2: its open
/// transaction is fenced and aborted, none of its writes become visible; a read_committed
/// consumer sees each (key, version) exactly once and never a decrease.
#[test]
fn real_broker_exactly_once_zombie_is_fenced() {
    sigstop_then_sigcont(Env::real_exactly_once(None));
}

/// kill -9 between produce and commit under exactly_once_v2: the records the first run
/// forwarded to the repartition topic were never committed, so read_committed consumers
/// never see them; after a restart each (key, version) is on the output exactly once and
/// the state is exact.
#[test]
fn real_broker_exactly_once_kill9_between_produce_and_commit() {
    let env = Env::real_exactly_once(Some("reader_id"));
    let events = zipf_workload(34, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let file = env.state.path().join("topology.toml");
    // First run: no commit for 10 minutes, so everything it forwards stays uncommitted.
    std::fs::write(&file, env.topology_text_with_commit("10m")).unwrap();
    env.produce(first, 0);
    let mut child = spawn_cli_in(&env, &file, env.state.path(), &[]);
    let repartition = env.repartition_topic();
    wait_for(
        "the first run to forward its records",
        Duration::from_secs(60),
        || {
            kafka::end_offsets(&env.brokers(), &repartition)
                .iter()
                .sum::<i64>()
                >= first.len() as i64
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        kafka::count_records(&env.brokers(), &repartition),
        0,
        "read_committed sees none of what the killed run forwarded (never committed)"
    );
    std::fs::write(&file, env.topology_text()).unwrap();
    env.produce(second, 0);
    let mut child = spawn_cli_in(&env, &file, env.state.path(), &[]);
    let updates = env.read_updates(&want);
    terminate(&mut child);
    check_output_monotonic(&updates, &want);
    check_each_version_once(&updates);
    check_final_state(&env, &want);
}
