//! Producers' key partitioners, so that readstate can tell where a producer put a key.
//!
//! Co-partitioned sources meet in one task only if every producer put a conversation's
//! records on the same partition. Each source declares the partitioner its producers use;
//! a task checks every record it folds against it (see `processor::node`), and a record
//! found elsewhere is a dead letter (`misrouted`), never folded into the wrong task.
//!
//! The functions follow the clients bit for bit; `tests::agrees_with_librdkafka` checks
//! them against librdkafka's own partitioners through a producer.

use std::fmt;
use std::str::FromStr;

/// A producer's key partitioner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Partitioner {
    /// Java clients' default (`Utils.murmur2`), librdkafka's `murmur2_random`; the
    /// partitioner of readstate's own producers.
    #[default]
    Murmur2,
    /// librdkafka's `consistent`: CRC-32 of the key.
    Crc32,
    /// librdkafka's default, `consistent_random`: CRC-32 of the key (a record without a
    /// key goes anywhere, so it is never where a conversation's records are expected).
    ConsistentRandom,
    /// FNV-1a, as Sarama's `NewHashPartitioner` (Go) and librdkafka's `fnv1a`.
    Fnv1a,
}

impl Partitioner {
    pub const NAMES: &'static str = "murmur2, crc32, consistent_random, fnv1a";

    /// The partition among `partitions` a producer with this partitioner picks for `key`.
    pub fn partition(self, key: &[u8], partitions: i32) -> i32 {
        debug_assert!(partitions > 0);
        let n = partitions.max(1) as u32;
        let h = match self {
            Self::Murmur2 => (murmur2(key) & 0x7fff_ffff) as u32,
            Self::Crc32 | Self::ConsistentRandom => crc32(key),
            Self::Fnv1a => fnv1a(key).unsigned_abs(),
        };
        (h % n) as i32
    }

    /// The name in topology files (and librdkafka's `partitioner`, except `crc32`, which
    /// librdkafka calls `consistent`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Murmur2 => "murmur2",
            Self::Crc32 => "crc32",
            Self::ConsistentRandom => "consistent_random",
            Self::Fnv1a => "fnv1a",
        }
    }
}

impl fmt::Display for Partitioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Partitioner {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "murmur2" | "murmur2_random" => Self::Murmur2,
            "crc32" | "consistent" => Self::Crc32,
            "consistent_random" => Self::ConsistentRandom,
            "fnv1a" | "fnv1a_random" => Self::Fnv1a,
            other => {
                return Err(format!(
                    "unknown partitioner {other:?} (one of {})",
                    Self::NAMES
                ))
            }
        })
    }
}

/// Kafka's `Utils.murmur2` (seed 0x9747b28c), as a signed 32-bit value.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// CRC-32 (IEEE 802.3, reflected, as zlib and librdkafka's `rd_crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for b in data {
        c = CRC_TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// 32-bit FNV-1a, as a signed value (Sarama takes the partition of its absolute value).
pub fn fnv1a(data: &[u8]) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (data, want) in cases {
            assert_eq!(murmur2(data), want, "{}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn crc32_and_fnv1a_match_their_definitions() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926, "the CRC-32 check value");
        assert_eq!(fnv1a(b"") as u32, 0x811c_9dc5);
        assert_eq!(fnv1a(b"a") as u32, 0xe40c_292c);
        assert_eq!(fnv1a(b"foobar") as u32, 0xbf9c_f968);
    }

    #[test]
    fn names_parse_both_ways() {
        for p in [
            Partitioner::Murmur2,
            Partitioner::Crc32,
            Partitioner::ConsistentRandom,
            Partitioner::Fnv1a,
        ] {
            assert_eq!(p.name().parse::<Partitioner>(), Ok(p));
        }
        assert_eq!("consistent".parse(), Ok(Partitioner::Crc32));
        let err = "random".parse::<Partitioner>().unwrap_err();
        assert!(err.contains("murmur2, crc32"), "{err}");
    }

    /// librdkafka's partitioners, run by a producer against the mock cluster, put 300
    /// keys (decimal conversation ids, as readstate keys them) where these functions say.
    #[test]
    fn agrees_with_librdkafka() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::ProducerContext;
        use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer};
        use rdkafka::{ClientConfig, ClientContext, Message};
        use std::sync::Mutex;

        #[derive(Default)]
        struct Placed(Mutex<Vec<(String, i32)>>);
        impl ClientContext for Placed {}
        impl ProducerContext for Placed {
            type DeliveryOpaque = ();
            fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
                let m = r.as_ref().expect("delivered");
                let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
                self.0.lock().unwrap().push((key, m.partition()));
            }
        }

        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("p", 16, 1).unwrap();
        for (name, ours) in [
            ("murmur2_random", Partitioner::Murmur2),
            ("consistent", Partitioner::Crc32),
            ("consistent_random", Partitioner::ConsistentRandom),
            ("fnv1a", Partitioner::Fnv1a),
        ] {
            let producer: BaseProducer<Placed> = ClientConfig::new()
                .set("bootstrap.servers", mock.bootstrap_servers())
                .set("partitioner", name)
                .create_with_context(Placed::default())
                .unwrap();
            for c in (-50i64..250).map(|i| i * 7919) {
                let key = c.to_string();
                producer
                    .send(
                        BaseRecord::<str, [u8]>::to("p")
                            .key(key.as_str())
                            .payload(b"x"),
                    )
                    .unwrap();
            }
            producer.flush(std::time::Duration::from_secs(10)).unwrap();
            let placed = producer.context().0.lock().unwrap().clone();
            assert_eq!(placed.len(), 300, "{name}");
            let spread: std::collections::HashSet<i32> = placed.iter().map(|p| p.1).collect();
            assert!(spread.len() > 8, "{name}: keys spread over {spread:?}");
            for (key, partition) in placed {
                assert_eq!(
                    ours.partition(key.as_bytes(), 16),
                    partition,
                    "{name}: key {key}"
                );
            }
        }
    }
}
