//! Group membership as this instance knows it: the member id its tasks were assigned
//! under, and whether a pause (a long gap between polls, or a commit that took as long) may
//! have let the group move on without it. Time comes from an injectable [`Clock`].
//!
//! The monitor decides, and probes the coordinator (committing the last committed offsets
//! again); acting on a [`Verdict`] (losing tasks, requeueing them) is the task manager's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

use crate::backoff::Clock;

/// What a membership check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Membership {
    Kept,
    Lost,
    Unknown,
}

/// What the member id says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MemberIdCheck {
    /// The same member (or none recorded yet).
    Same,
    /// librdkafka rejoined under a new member id: the tasks were lost.
    Changed { was: String, now: String },
    /// No member id now: rejoining.
    Rejoining,
}

/// What a member check or a probe of the coordinator concluded, for the task manager to
/// act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Kept,
    /// Not known now (rejoining, rebalancing, the coordinator unreachable): no commit.
    Unknown,
    /// The client began rejoining while a probe's commit went through: no commit, and
    /// nothing to lose yet (the rebalance revokes what is gone).
    Rejoining,
    /// librdkafka rejoined under a new member id: every task is lost (librdkafka revokes
    /// the lost assignment and assigns again, so nothing is requeued).
    Rejoined(String),
    /// librdkafka reports the assignment lost.
    AssignmentLost,
    /// The coordinator refused the probe: this member was removed; every task is lost
    /// and the partitions still assigned are queued again.
    Removed(String),
}

impl Verdict {
    pub(super) fn membership(&self) -> Membership {
        match self {
            Verdict::Kept => Membership::Kept,
            Verdict::Unknown => Membership::Unknown,
            _ => Membership::Lost,
        }
    }
}

/// Why tasks are lost, which decides whether their stores are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Loss {
    /// This member may have left the group (its session expired, it was fenced, it
    /// rejoined under a new member id): another owner may have written the changelogs
    /// while this one still wrote them, so under at-least-once the stores are wiped.
    Left,
    /// The group's generation moved on while this member stayed in it (librdkafka reports
    /// the assignment lost after an `IllegalGeneration`): nobody else can own its
    /// partitions before it rejoins, so the stores, which hold only committed data, are
    /// kept, and a task assigned again restores only what its changelog gained.
    Stayed,
}

#[derive(Debug)]
pub(super) struct MembershipMonitor {
    clock: Arc<dyn Clock>,
    /// When the poll loop last returned from `poll`.
    last_poll: Instant,
    /// A gap between polls (or a commit) longer than this means the group may have moved
    /// on: membership is verified before the next commit.
    probe_after: Duration,
    /// Set after such a gap until a membership probe succeeds.
    suspect: bool,
    /// The group member id the running tasks were assigned under.
    member: Option<String>,
    /// The consumer group protocol of KIP-848: the member id stays the same after the
    /// member was fenced, so it tells nothing of a loss.
    consumer_protocol: bool,
}

impl MembershipMonitor {
    /// Suspects a pause after a third of the session timeout without a poll.
    pub(super) fn new(clock: Arc<dyn Clock>, session_timeout: Duration) -> Self {
        Self {
            last_poll: clock.now(),
            clock,
            probe_after: session_timeout / 3,
            suspect: false,
            member: None,
            consumer_protocol: false,
        }
    }

    /// Under the consumer group protocol of KIP-848 (see [`Self::judge_loss`]).
    pub(super) fn with_consumer_protocol(mut self, on: bool) -> Self {
        self.consumer_protocol = on;
        self
    }

    pub(super) fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The poll loop returned from `poll`: note a gap long enough to doubt membership.
    pub(super) fn polled(&mut self) {
        let now = self.clock.now();
        let gap = now.duration_since(self.last_poll);
        if gap > self.probe_after {
            if !self.suspect {
                tracing::warn!(?gap, "long gap between polls (process paused or stalled): membership is verified before the next commit");
            }
            self.suspect = true;
        }
        self.last_poll = now;
    }

    /// Start-up work before the first poll is no gap between polls.
    pub(super) fn started(&mut self) {
        self.last_poll = self.clock.now();
    }

    /// Whether something that began at `started` took long enough to span a pause past
    /// the session timeout.
    pub(super) fn took_long(&self, started: Instant) -> bool {
        self.clock.now().duration_since(started) > self.probe_after
    }

    pub(super) fn is_suspect(&self) -> bool {
        self.suspect
    }

    pub(super) fn suspect(&mut self) {
        self.suspect = true;
    }

    pub(super) fn verified(&mut self) {
        self.suspect = false;
    }

    pub(super) fn is_consumer_protocol(&self) -> bool {
        self.consumer_protocol
    }

    /// Judge a loss librdkafka reports (`assignment_lost`) with the member id now: the
    /// same one as the tasks were assigned under, and no pause since, means the member
    /// stayed in the group (under the classic protocol a session timeout or an unknown
    /// member resets the id; under KIP-848's it does not, and every loss is real).
    pub(super) fn judge_loss(&self, now: Option<&str>) -> Loss {
        if self.consumer_protocol {
            return Loss::Left;
        }
        match (&self.member, now) {
            (Some(was), Some(now)) if was == now && !self.suspect => Loss::Stayed,
            _ => Loss::Left,
        }
    }

    pub(super) fn assigned_under(&mut self, member: Option<String>) {
        self.member = member;
    }

    /// The member id now against the one the tasks were assigned under (with no task
    /// running, membership is not in question): changed means the client lost its
    /// membership and rejoined (librdkafka resets the member id after a session timeout);
    /// none yet means it is rejoining.
    pub(super) fn member_verdict(&self, idle: bool, now: Option<String>) -> Verdict {
        if idle {
            return Verdict::Kept;
        }
        match self.check_member(now) {
            MemberIdCheck::Changed { was, now } => {
                Verdict::Rejoined(format!("group member id changed from {was} to {now}"))
            }
            MemberIdCheck::Rejoining => Verdict::Unknown,
            MemberIdCheck::Same => Verdict::Kept,
        }
    }

    /// Commit, once more, the offsets already `committed`: the group coordinator refuses
    /// it if this member was removed. Any failure other than a refusal leaves the answer
    /// unknown (a commit is postponed, and the probe repeated next time).
    pub(super) fn probe<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        committed: &TopicPartitionList,
        idle: bool,
    ) -> Verdict {
        if consumer.assignment_lost() {
            return Verdict::AssignmentLost;
        }
        let member = || crate::kafka::member_id(consumer);
        match self.member_verdict(idle, member()) {
            Verdict::Kept => {}
            other => return other,
        }
        if committed.count() == 0 {
            self.verified();
            return Verdict::Kept;
        }
        match consumer.commit(committed, CommitMode::Sync) {
            // The client may have rejoined (a new member id) while the commit waited.
            Ok(()) => match self.member_verdict(idle, member()) {
                Verdict::Kept => {
                    tracing::info!("membership verified after a long gap between polls");
                    self.verified();
                    Verdict::Kept
                }
                Verdict::Unknown => Verdict::Rejoining,
                other => other,
            },
            Err(e) if refusal(&e) == Some(Refusal::Gone) => {
                Verdict::Removed(format!("membership probe refused: {e}"))
            }
            Err(e) if refusal(&e) == Some(Refusal::Rebalancing) => {
                // Still a member: the rebalance tells what stays owned.
                tracing::info!(error = %e, "membership probe refused while the group rebalances; commit postponed");
                Verdict::Unknown
            }
            Err(e) => {
                tracing::warn!(error = %e, "membership probe failed; commit postponed");
                Verdict::Unknown
            }
        }
    }

    /// Compare the member id now with the one the tasks were assigned under.
    pub(super) fn check_member(&self, now: Option<String>) -> MemberIdCheck {
        match (&self.member, now) {
            (Some(was), Some(now)) if *was != now => MemberIdCheck::Changed {
                was: was.clone(),
                now,
            },
            (Some(_), None) => MemberIdCheck::Rejoining,
            _ => MemberIdCheck::Same,
        }
    }
}

/// Why the group coordinator refused a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The group is rebalancing, or its generation (member epoch) moved on while this member
    /// stayed in it: the commit is postponed, and retried after the rebalance for the
    /// partitions still owned. Nothing is lost: the stores hold only committed data.
    Rebalancing,
    /// This member is no longer in the group (removed after its session expired, or
    /// fenced): every task is lost.
    Gone,
}

/// How a commit error bears on membership: `None` when it does not (a transport error,
/// a timeout: the next commit covers it).
pub(super) fn refusal(e: &RdKafkaError) -> Option<Refusal> {
    e.rdkafka_error_code().and_then(refusal_of)
}

pub(super) fn refusal_of(c: RDKafkaErrorCode) -> Option<Refusal> {
    match c {
        RDKafkaErrorCode::IllegalGeneration
        | RDKafkaErrorCode::RebalanceInProgress
        | RDKafkaErrorCode::StaleMemberEpoch => Some(Refusal::Rebalancing),
        RDKafkaErrorCode::UnknownMemberId
        | RDKafkaErrorCode::FencedInstanceId
        | RDKafkaErrorCode::FencedMemberEpoch
        | RDKafkaErrorCode::AssignmentLost => Some(Refusal::Gone),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::ManualClock;

    /// A gap between polls over a third of the session timeout makes membership suspect,
    /// measured on the injected clock (no sleep).
    #[test]
    fn a_long_gap_between_polls_is_suspect() {
        let clock = ManualClock::new();
        let mut m = MembershipMonitor::new(clock.clone(), Duration::from_secs(30));
        clock.advance(Duration::from_secs(9));
        m.polled();
        assert!(!m.is_suspect(), "9 s of a 10 s allowance");
        clock.advance(Duration::from_secs(11));
        m.polled();
        assert!(m.is_suspect());
        m.verified();
        assert!(!m.is_suspect());
        let started = m.now();
        clock.advance(Duration::from_secs(10));
        assert!(!m.took_long(started));
        clock.advance(Duration::from_millis(1));
        assert!(m.took_long(started));
    }

    #[test]
    fn a_changed_member_id_means_the_tasks_were_lost() {
        let mut m = MembershipMonitor::new(ManualClock::new(), Duration::from_secs(30));
        assert_eq!(m.check_member(Some("b".into())), MemberIdCheck::Same);
        m.assigned_under(Some("a".into()));
        assert_eq!(m.check_member(Some("a".into())), MemberIdCheck::Same);
        assert_eq!(m.check_member(None), MemberIdCheck::Rejoining);
        assert_eq!(
            m.check_member(Some("b".into())),
            MemberIdCheck::Changed {
                was: "a".into(),
                now: "b".into()
            }
        );
    }

    #[test]
    fn a_loss_under_the_same_member_id_without_a_pause_keeps_the_stores() {
        let clock = ManualClock::new();
        let mut m = MembershipMonitor::new(clock.clone(), Duration::from_secs(30));
        assert_eq!(m.judge_loss(Some("a")), Loss::Left, "no member recorded");
        m.assigned_under(Some("a".into()));
        assert_eq!(m.judge_loss(Some("a")), Loss::Stayed);
        assert_eq!(m.judge_loss(None), Loss::Left, "member id reset");
        assert_eq!(m.judge_loss(Some("b")), Loss::Left, "rejoined");
        clock.advance(Duration::from_secs(11));
        m.polled();
        assert_eq!(m.judge_loss(Some("a")), Loss::Left, "after a pause");
        let mut m =
            MembershipMonitor::new(clock, Duration::from_secs(30)).with_consumer_protocol(true);
        m.assigned_under(Some("a".into()));
        assert_eq!(
            m.judge_loss(Some("a")),
            Loss::Left,
            "KIP-848 keeps the member id"
        );
    }

    #[test]
    fn refusals_are_told_apart_and_from_transient_errors() {
        let commit = RdKafkaError::ConsumerCommit;
        for c in [
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::RebalanceInProgress,
            RDKafkaErrorCode::StaleMemberEpoch,
        ] {
            assert_eq!(refusal(&commit(c)), Some(Refusal::Rebalancing), "{c:?}");
        }
        for c in [
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::FencedInstanceId,
            RDKafkaErrorCode::FencedMemberEpoch,
        ] {
            assert_eq!(refusal(&commit(c)), Some(Refusal::Gone), "{c:?}");
        }
        for c in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            assert_eq!(refusal(&commit(c)), None, "{c:?}");
        }
    }
}
