//! The task manager's lifecycle against librdkafka's mock cluster: assign, open,
//! corrupted checkpoints and lost tasks.

use super::*;
use crate::ids::TaskId;
use crate::kafka::KafkaSettings;
use crate::serde::LocalRegistry;
use crate::state::{put_checkpoint, StoreBatch};
use rdkafka::mocking::MockCluster;
use rdkafka::TopicPartitionList;
use std::sync::Arc;

fn manager(brokers: &str, dir: &std::path::Path) -> TaskManager {
    let text = format!(
        r#"
[application]
id = "app"
state_dir = "{}"
[[source]]
name = "events"
topic = "src"
[[store]]
name = "read-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["events"]
store = "read-state"
[[sink]]
name = "updates"
kind = "kafka"
input = "read-state"
topic = "out"
"#,
        dir.display()
    );
    let topology = crate::topology::compile(&text).unwrap();
    let cfg = RunConfig::new(
        topology,
        KafkaSettings::new(brokers),
        Arc::new(LocalRegistry::new()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let node = rt
        .block_on(crate::processor::node::build(
            &cfg.topology,
            cfg.resolver.clone(),
            &std::sync::atomic::AtomicBool::new(false),
        ))
        .unwrap();
    TaskManager::new(&cfg, node, rt).unwrap()
}

/// Assign parks the partitions; open judges checkpoints (one beyond the empty
/// changelog is wiped), restores and starts the tasks, resuming the partitions; a loss
/// while still a member keeps their stores; a loss after leaving the group closes them
/// dirty and wipes their stores (at-least-once).
#[test]
fn assign_open_corrupted_and_lost() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("src", 2, 1).unwrap();
    mock.create_topic("app-read-state-changelog", 2, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut tm = manager(&mock.bootstrap_servers(), dir.path());
    {
        let mut s = tm.updater.state().open(TaskId::new(0, 0), 0).unwrap();
        let mut b = StoreBatch::default();
        put_checkpoint(&mut b, 100);
        s.write(b).unwrap();
    }
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "g")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition("src", 0);
    tpl.add_partition("src", 1);
    consumer.assign(&tpl).unwrap();
    let parts = vec![("src".to_owned(), 0), ("src".to_owned(), 1)];
    let pause = tm.assign(&parts, Some("m1".into()));
    assert_eq!(pause, parts, "restoring partitions are paused");
    assert_eq!(tm.parking.len(), 2);
    tm.open_assigned(&consumer).unwrap();
    while tm.tasks.running.len() < 2 {
        tm.restore_step(&consumer).unwrap();
    }
    assert!(tm.parking.is_empty(), "resumed once restored");
    assert!(tm.readiness.is_ready(), "assigned and restored");
    assert_eq!(
        tm.summary().lifecycle.tasks_corrupted,
        1,
        "the checkpoint beyond the end"
    );
    let dirs: Vec<_> = [0, 1]
        .map(|p| tm.updater.state().store_dir(TaskId::new(0, p), 0))
        .into();
    assert!(dirs.iter().all(|d| d.exists()));
    // The generation moved on while this member stayed: stores kept, tasks opened again
    // without a restore.
    tm.lose_all("test", Loss::Stayed);
    assert!(tm.tasks.running.is_empty() && dirs.iter().all(|d| d.exists()));
    tm.assign(&parts, Some("m1".into()));
    tm.open_assigned(&consumer).unwrap();
    while tm.tasks.running.len() < 2 {
        tm.restore_step(&consumer).unwrap();
    }
    assert_eq!(tm.summary().lifecycle.restored_records, 0);
    assert_eq!(
        tm.summary().lifecycle.tasks_corrupted,
        1,
        "kept stores are not corrupted"
    );
    tm.lose_all("test", Loss::Left);
    assert!(tm.tasks.running.is_empty());
    assert!(
        !tm.readiness.is_ready(),
        "nothing runs until the next assignment"
    );
    assert_eq!(tm.summary().lifecycle.tasks_lost, 4);
    assert!(dirs.iter().all(|d| !d.exists()), "lost stores are wiped");
}
