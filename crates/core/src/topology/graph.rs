//! A compiled topology as a graph (Kafka Streams' `InternalTopologyBuilder` output):
//! source nodes → processor node → its stores, and processor → sink nodes. The runtime
//! and the test driver route on it: a record of a task's topic goes to the input of the
//! processor its source node feeds ([`Graph::route`]), decoded as that source's records,
//! and each of the processor's outputs to the topic of its sink node ([`Graph::sink_topic`]).

use super::Topology;
use crate::ids::{StoreName, TopicName};
use crate::processor::{InputId, RecordKind};

/// A node's position in [`Graph::nodes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// Records of `topic` as the stream tasks consume them (the repartition topic of a
    /// repartitioned source), and of its `rerouted` topic (records readstate moved to the
    /// partition they belong on).
    Source {
        topic: TopicName,
        rerouted: Option<TopicName>,
        records: RecordKind,
    },
    Processor {
        kind: String,
    },
    /// A store of the processor, with its changelog (index: its position among the
    /// task's stores).
    Store {
        index: usize,
        changelog: Option<TopicName>,
    },
    Sink {
        topic: TopicName,
        output: Output,
    },
}

/// What a processor emits to a sink node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Output {
    /// Receipt updates (one per advanced key per flush).
    Receipts,
    /// Conversation-head updates (one per changed conversation per flush).
    ConversationHeads,
    /// Read receipts for senders, keyed by sender (one per sender, conversation and
    /// reader per emitted advance).
    SenderReceipts,
    /// "Read by N of M" for each sender's latest message, keyed by sender (when N or M
    /// changed, at most one per sender and conversation per flush).
    ReadBy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub kind: NodeKind,
}

/// Where records of a task topic go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub topic: TopicName,
    pub input: InputId,
    pub records: RecordKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    /// (from, to): source → processor (in input order), processor → store, processor →
    /// sink.
    pub edges: Vec<(NodeId, NodeId)>,
}

impl Graph {
    /// The stream tasks' sub-topology of `t`.
    pub fn compile(t: &Topology) -> Self {
        let mut g = Graph {
            nodes: Vec::new(),
            edges: Vec::new(),
        };
        let processor = g.add(
            &t.processor.name,
            NodeKind::Processor {
                kind: t.processor.kind.clone(),
            },
        );
        for input in &t.processor.inputs {
            let members = t.members.as_ref().filter(|m| &m.name == input);
            let (s, records) = match (&t.messages, members) {
                (_, Some(m)) => (m, RecordKind::Members),
                (Some(m), _) if &m.name == input => (m, RecordKind::MessageEvents),
                _ => {
                    let s = t
                        .sources
                        .iter()
                        .find(|s| &s.name == input)
                        .expect("compiled inputs name sources");
                    (s, RecordKind::ReadEvents)
                }
            };
            let kind = NodeKind::Source {
                topic: s.task_input_topic().clone(),
                rerouted: s.rerouted_topic.clone(),
                records,
            };
            let source = g.add(input, kind);
            g.edges.push((source, processor));
        }
        for (index, store) in t.stores().into_iter().enumerate() {
            let changelog = store.changelog_topic.clone();
            let node = g.add(store.name.as_str(), NodeKind::Store { index, changelog });
            g.edges.push((processor, node));
        }
        let sinks = std::iter::once((&t.output, Output::Receipts))
            .chain(
                t.heads_output
                    .iter()
                    .map(|h| (h, Output::ConversationHeads)),
            )
            .chain((t.sender_receipts_output.iter()).map(|h| (h, Output::SenderReceipts)))
            .chain((t.read_by_output.iter()).map(|h| (h, Output::ReadBy)));
        for (sink, output) in sinks {
            let topic = sink.topic.clone();
            let node = g.add(&sink.name, NodeKind::Sink { topic, output });
            g.edges.push((processor, node));
        }
        g
    }

    fn add(&mut self, name: &str, kind: NodeKind) -> NodeId {
        self.nodes.push(Node {
            name: name.to_owned(),
            kind,
        });
        NodeId(self.nodes.len() - 1)
    }

    /// Every task topic with the processor input its records go to, in input order (a
    /// source's rerouted topic goes to the same input as the source).
    pub fn routes(&self) -> Vec<Route> {
        let mut routes = Vec::new();
        let sources = self
            .edges
            .iter()
            .filter_map(|(from, _)| match &self.nodes[from.0].kind {
                NodeKind::Source {
                    topic,
                    rerouted,
                    records,
                } => Some((topic, rerouted, records)),
                _ => None,
            });
        for (i, (topic, rerouted, records)) in sources.enumerate() {
            for topic in std::iter::once(topic).chain(rerouted) {
                routes.push(Route {
                    topic: topic.clone(),
                    input: InputId(i),
                    records: *records,
                });
            }
        }
        routes
    }

    /// The route of a task topic's records.
    pub fn route<'a>(routes: &'a [Route], topic: &str) -> Option<&'a Route> {
        routes.iter().find(|r| r.topic.as_str() == topic)
    }

    /// The topics of the sink nodes, in graph order (a processor's `SinkId` is the
    /// position here).
    pub fn sink_topics(&self) -> Vec<&TopicName> {
        self.nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::Sink { topic, .. } => Some(topic),
                _ => None,
            })
            .collect()
    }

    /// The topic of the sink node the processor's `output` goes to, if it has one.
    pub fn sink_topic(&self, output: Output) -> Option<&TopicName> {
        self.nodes.iter().find_map(|n| match &n.kind {
            NodeKind::Sink { topic, output: o } if *o == output => Some(topic),
            _ => None,
        })
    }

    /// The processor's stores, in their index order.
    pub fn stores(&self) -> Vec<StoreName> {
        let mut stores: Vec<(usize, StoreName)> = self
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::Store { index, .. } => Some((*index, StoreName(n.name.clone()))),
                _ => None,
            })
            .collect();
        stores.sort_by_key(|(i, _)| *i);
        stores.into_iter().map(|(_, s)| s).collect()
    }

    /// The names of the nodes `node` feeds.
    pub fn children(&self, node: NodeId) -> Vec<&str> {
        self.edges
            .iter()
            .filter(|(from, _)| *from == node)
            .map(|(_, to)| self.nodes[to.0].name.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::compile;

    #[test]
    fn both_sources_route_to_one_processor_with_two_stores() {
        let text = include_str!("../../../../topologies/read_state_with_unread.toml").replace(
            "partitioner = \"murmur2\"",
            "partitioner = \"murmur2\"\non_misrouted = \"repartition\"",
        );
        let t = compile(&text).unwrap();
        let g = Graph::compile(&t);
        let routes = g.routes();
        let seen: Vec<_> = (routes.iter())
            .map(|r| (r.topic.as_str(), r.input, r.records))
            .collect();
        assert_eq!(
            seen,
            [
                ("chat.read-events", InputId(0), RecordKind::ReadEvents),
                (
                    "read-state-unread-read-events-rerouted",
                    InputId(0),
                    RecordKind::ReadEvents
                ),
                ("chat.message-events", InputId(1), RecordKind::MessageEvents),
                (
                    "read-state-unread-message-events-rerouted",
                    InputId(1),
                    RecordKind::MessageEvents
                ),
            ],
            "each source's rerouted topic goes to the source's input"
        );
        assert_eq!(
            Graph::route(&routes, "chat.message-events").map(|r| r.input),
            Some(InputId(1))
        );
        assert!(Graph::route(&routes, "chat.receipt-updates").is_none());
        assert_eq!(
            g.sink_topic(Output::Receipts).map(TopicName::as_str),
            Some("chat.receipt-updates")
        );
        assert_eq!(
            g.sink_topic(Output::ConversationHeads)
                .map(TopicName::as_str),
            Some("chat.conversation-heads")
        );
        let stores = g.stores();
        let names: Vec<&str> = stores.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["read-state", "head-state"]);
        let processor = NodeId(0);
        assert_eq!(
            g.children(processor),
            [
                "read-state",
                "head-state",
                "receipt-updates",
                "conversation-heads"
            ]
        );
        let changelogs: Vec<_> = g
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::Store { changelog, .. } => changelog.clone(),
                _ => None,
            })
            .collect();
        assert_eq!(
            changelogs,
            [
                TopicName("read-state-unread-read-state-changelog".into()),
                TopicName("read-state-unread-head-state-changelog".into())
            ],
            "a changelog per store"
        );
    }

    #[test]
    fn a_repartitioned_source_routes_from_its_repartition_topic() {
        let text = include_str!("../../../../topologies/json_read_receipts.toml");
        let t = compile(text).unwrap();
        let routes = Graph::compile(&t).routes();
        assert_eq!(routes.len(), 1, "placed by readstate: no rerouted topic");
        let repartition = t.sources[0].repartition_topic.as_ref();
        assert_eq!(Some(&routes[0].topic), repartition);
        assert_eq!(&routes[0].topic, t.sources[0].task_input_topic());
        assert_eq!(routes[0].records, RecordKind::ReadEvents);
        let g = Graph::compile(&t);
        assert_eq!(g.sink_topic(Output::Receipts), Some(&t.output.topic));
        assert_eq!(g.sink_topic(Output::ConversationHeads), None);
    }
}
