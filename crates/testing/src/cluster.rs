//! A real Apache Kafka cluster of N KRaft nodes (each broker and controller) on loopback
//! ports, for the fault tests: every node a `java kafka.Kafka` child process from the jars
//! that `scripts/test` resolves (`$KAFKA_JARS`), killed, stopped and started again on
//! demand. Internal topics are replicated 3 times with `min.insync.replicas = 2` (the
//! broker defaults here), so one node may be down without refusing writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::wait::wait_until;

struct Node {
    id: i32,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    jars: String,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// A port free now on 127.0.0.1.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn java(jars: &str) -> Command {
    let mut c = Command::new("java");
    c.arg("-cp").arg(format!("{jars}/*"));
    c
}

fn properties(id: i32, port: u16, cport: u16, voters: &str, dir: &Path) -> String {
    format!(
        "process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
auto.create.topics.enable=false
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
offsets.topic.replication.factor=3
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
group.classic.min.session.timeout.ms=3000
log.retention.check.interval.ms=1000
",
        data = dir.join("data").display()
    )
}

impl Cluster {
    /// Format and start `n` nodes; returns once every node serves metadata.
    pub fn start(n: usize) -> Self {
        let jars = std::env::var("KAFKA_JARS").expect(
            "KAFKA_JARS is not set: run scripts/test, which resolves Apache Kafka from Maven Central",
        );
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let voters: Vec<String> = (0..n)
            .map(|i| format!("{}@127.0.0.1:{}", i + 1, ports[i].1))
            .collect();
        let out = java(&jars)
            .args(["kafka.tools.StorageTool", "random-uuid"])
            .output()
            .unwrap();
        let cluster_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let mut nodes = Vec::new();
        let mut formats = Vec::new();
        for (i, (port, cport)) in ports.iter().enumerate() {
            let id = i as i32 + 1;
            let node_dir = dir.path().join(format!("node-{id}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let props = properties(id, *port, *cport, &voters.join(","), &node_dir);
            std::fs::write(node_dir.join("server.properties"), props).unwrap();
            formats.push(
                java(&jars)
                    .args(["kafka.tools.StorageTool", "format", "-t", &cluster_id, "-c"])
                    .arg(node_dir.join("server.properties"))
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            nodes.push(Node {
                id,
                port: *port,
                dir: node_dir,
                child: None,
            });
        }
        for mut f in formats {
            assert!(f.wait().unwrap().success(), "kafka storage format failed");
        }
        let mut cluster = Cluster {
            jars,
            nodes,
            _dir: dir,
        };
        for id in 1..=n as i32 {
            cluster.spawn(id);
        }
        for id in 1..=n as i32 {
            cluster.wait_serving(id);
        }
        cluster.wait_brokers(n);
        cluster
    }

    fn node(&mut self, id: i32) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node id")
    }

    fn spawn(&mut self, id: i32) {
        let jars = self.jars.clone();
        let node = self.node(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("server.log"))
            .unwrap();
        let child = java(&jars)
            .args(["-Xms128m", "-Xmx512m", "kafka.Kafka"])
            .arg(node.dir.join("server.properties"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// Wait until node `id` answers a metadata request.
    fn wait_serving(&self, id: i32) {
        let node = self.nodes.iter().find(|n| n.id == id).expect("node id");
        let addr = format!("127.0.0.1:{}", node.port);
        wait_until(
            &format!("kafka node {id} to serve"),
            Duration::from_secs(120),
            || {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &addr)
                    .create()
                    .ok()?;
                c.fetch_metadata(None, Duration::from_secs(2))
                    .ok()
                    .map(|_| ())
            },
        );
    }

    fn wait_brokers(&self, n: usize) {
        wait_until(
            &format!("{n} brokers in the metadata"),
            Duration::from_secs(120),
            || (self.metadata_brokers() == n).then_some(()),
        );
    }

    fn metadata_brokers(&self) -> usize {
        let c: BaseConsumer = match ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
        {
            Ok(c) => c,
            Err(_) => return 0,
        };
        c.fetch_metadata(None, Duration::from_secs(2))
            .map_or(0, |m| m.brokers().len())
    }

    /// Every node's address, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        addrs.join(",")
    }

    pub fn node_ids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The node leading `topic` [`partition`] now.
    pub fn leader(&self, topic: &str, partition: i32) -> i32 {
        wait_until(
            &format!("a leader for {topic} [{partition}]"),
            Duration::from_secs(60),
            || {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", self.bootstrap())
                    .create()
                    .ok()?;
                let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
                let t = md.topics().first()?;
                let p = t.partitions().iter().find(|p| p.id() == partition)?;
                (p.leader() > 0).then_some(p.leader())
            },
        )
    }

    /// SIGKILL node `id` (no shutdown: its unflushed log tail is lost).
    pub fn kill(&mut self, id: i32) {
        if let Some(mut c) = self.node(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM node `id` and wait for its controlled shutdown (leaders moved first).
    pub fn stop(&mut self, id: i32) {
        if let Some(mut c) = self.node(id).child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let status = crate::wait::wait_until(
                &format!("kafka node {id} to shut down"),
                Duration::from_secs(120),
                || c.try_wait().ok().flatten(),
            );
            let _ = status;
        }
    }

    /// Start node `id` again; returns once it serves and the cluster counts every node.
    pub fn restart(&mut self, id: i32) {
        self.spawn(id);
        self.wait_serving(id);
        self.wait_brokers(self.nodes.len());
    }

    /// Stop every node (SIGKILL: the whole cluster gone at once).
    pub fn kill_all(&mut self) {
        for id in self.node_ids() {
            self.kill(id);
        }
    }

    /// Start every node again (a KRaft quorum needs a majority of them at once).
    pub fn restart_all(&mut self) {
        let ids = self.node_ids();
        for id in &ids {
            self.spawn(*id);
        }
        for id in &ids {
            self.wait_serving(*id);
        }
        self.wait_brokers(ids.len());
    }

    /// The last lines of node `id`'s log, for a failure message.
    pub fn log_tail(&self, id: i32, lines: usize) -> String {
        let node = self.nodes.iter().find(|n| n.id == id).expect("node id");
        let text = std::fs::read_to_string(node.dir.join("server.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
