//! Newtypes for the identifiers that cross module boundaries.
//!
//! Domain ids (`ConversationId`, `ReaderId`, ...) wrap an [`Id`]: a 64-bit integer, a UUID
//! or a string, as the topology declares ([`IdType`]). Names of Kafka and store objects
//! are strings wrapped so they cannot be confused with each other.

use std::fmt;

mod id;

pub use id::{Id, IdError, IdType, MAX_ID_BYTES};

/// The id types a topology declares (`[ids]`): conversations, users (readers, senders,
/// mentioned users) and message ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdTypes {
    pub conversation: IdType,
    pub user: IdType,
    pub message: IdType,
}

impl Default for IdTypes {
    /// 64-bit conversation and user ids, text message ids: every earlier version's shape.
    fn default() -> Self {
        Self {
            conversation: IdType::I64,
            user: IdType::I64,
            message: IdType::String,
        }
    }
}

macro_rules! domain_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub Id);

        impl $name {
            /// The integer, for `i64` ids.
            pub fn as_int(&self) -> Option<i64> {
                self.0.as_int()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl From<i64> for $name {
            fn from(v: i64) -> Self {
                Self(Id::int(v))
            }
        }

        impl From<Id> for $name {
            fn from(v: Id) -> Self {
                Self(v)
            }
        }
    };
}

domain_id!(
    /// A conversation (channel, direct message, group).
    ConversationId
);
domain_id!(
    /// A user who reads.
    ReaderId
);
domain_id!(
    /// A user who sent a message.
    SenderId
);

macro_rules! name_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

name_id!(
    /// A Kafka topic.
    TopicName
);
name_id!(
    /// A state store, unique within an application.
    StoreName
);
name_id!(
    /// The application id: consumer group, prefix of internal topics and state directories.
    ApplicationId
);

/// A task: the unit of parallelism, one per input partition (as in Kafka Streams, `0_3` is
/// sub-topology 0, partition 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId {
    pub subtopology: u32,
    pub partition: i32,
}

impl TaskId {
    pub fn new(subtopology: u32, partition: i32) -> Self {
        Self {
            subtopology,
            partition,
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.subtopology, self.partition)
    }
}

/// Where a raw event came from: the source topic-partition it was first read from and its
/// offset there. Used to make replays harmless (see `processor::read_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Stable 32-bit id of (topic, partition); see [`Origin::source_id`].
    pub source: u32,
    pub offset: i64,
}

impl Origin {
    /// A stable id for a topic-partition (FNV-1a over the topic name and partition), so that
    /// replay marks survive restarts and do not depend on the order of sources in a topology.
    pub fn source_id(topic: &str, partition: i32) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for b in topic
            .as_bytes()
            .iter()
            .chain(partition.to_be_bytes().iter())
        {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h
    }

    /// Header carrying the origin through a repartition topic.
    pub const HEADER: &'static str = "readstate.origin";

    /// 12 bytes: source id (u32) and offset (i64), big-endian.
    pub fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&self.source.to_be_bytes());
        b[4..].copy_from_slice(&self.offset.to_be_bytes());
        b
    }

    /// The inverse of [`Origin::to_bytes`]; `None` unless exactly 12 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 12] = b.try_into().ok()?;
        Some(Self {
            source: u32::from_be_bytes(b[..4].try_into().ok()?),
            offset: i64::from_be_bytes(b[4..].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_id_depends_on_topic_and_partition() {
        let a = Origin::source_id("events", 0);
        assert_eq!(a, Origin::source_id("events", 0));
        assert_ne!(a, Origin::source_id("events", 1));
        assert_ne!(a, Origin::source_id("events2", 0));
        assert_eq!(TaskId::new(0, 3).to_string(), "0_3");
    }

    #[test]
    fn origin_round_trips_through_header_bytes() {
        let o = Origin {
            source: 0xdead_beef,
            offset: 1 << 40,
        };
        assert_eq!(Origin::from_bytes(&o.to_bytes()), Some(o));
        assert_eq!(Origin::from_bytes(&o.to_bytes()[..11]), None);
    }
}
