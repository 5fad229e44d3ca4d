//! Control messages waiting for room in a worker's socket. A guest can change its device's
//! state faster than a worker reads (a reset loop, a storm of config writes), so what waits
//! is the state the worker must reach, not the history: a reset drops the activation and
//! queue stops it overtakes, and the latest bytes written at a config offset win. What waits
//! is bounded by the device (its config size, its queues) whatever the guest does. Rate
//! limits set by the operator likewise: the latest per flow wins, and a reset keeps them.

use std::collections::{BTreeMap, BTreeSet};

use protocol::{BrokerMsg, Flow, Limit, QueueConfig};

#[derive(Default)]
pub struct Outbox {
    reset: bool,
    config: BTreeMap<u32, Vec<u8>>,
    limits: BTreeMap<Flow, Limit>,
    activate: Option<(u64, Vec<QueueConfig>, u64)>,
    stop: BTreeSet<u16>,
}

impl Outbox {
    /// Merges `msg` into what waits. Only control messages (reset, activate, config writes,
    /// queue stops, rate limits) are expected.
    pub fn push(&mut self, msg: BrokerMsg) {
        match msg {
            BrokerMsg::Reset => {
                self.reset = true;
                self.activate = None;
                self.stop.clear();
            }
            BrokerMsg::ConfigWrite { offset, data } => {
                self.config.insert(offset, data);
            }
            BrokerMsg::Activate {
                features,
                queues,
                epoch,
            } => self.activate = Some((features, queues, epoch)),
            BrokerMsg::StopQueue { index } => {
                self.stop.insert(index);
            }
            BrokerMsg::RateLimit { flow, limit } => {
                self.limits.insert(flow, limit);
            }
            other => log::debug!("{other:?} is not a control message; not queued"),
        }
    }

    /// The next message to send: the reset, config writes, rate limits (so the activation's
    /// first chains already go by them), the activation, then queue stops.
    pub fn front(&self) -> Option<BrokerMsg> {
        if self.reset {
            return Some(BrokerMsg::Reset);
        }
        if let Some((&offset, data)) = self.config.first_key_value() {
            return Some(BrokerMsg::ConfigWrite {
                offset,
                data: data.clone(),
            });
        }
        if let Some((&flow, &limit)) = self.limits.first_key_value() {
            return Some(BrokerMsg::RateLimit { flow, limit });
        }
        if let Some((features, queues, epoch)) = &self.activate {
            return Some(BrokerMsg::Activate {
                features: *features,
                queues: queues.clone(),
                epoch: *epoch,
            });
        }
        self.stop
            .first()
            .map(|&index| BrokerMsg::StopQueue { index })
    }

    /// [`Self::front`] was sent.
    pub fn pop(&mut self) {
        if std::mem::take(&mut self.reset) {
            return;
        }
        if self.config.pop_first().is_some() {
            return;
        }
        if self.limits.pop_first().is_some() {
            return;
        }
        if self.activate.take().is_some() {
            return;
        }
        self.stop.pop_first();
    }

    pub fn is_empty(&self) -> bool {
        self.front().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(o: &mut Outbox) -> Vec<BrokerMsg> {
        let mut out = Vec::new();
        while let Some(m) = o.front() {
            out.push(m);
            o.pop();
        }
        out
    }

    fn activate(features: u64) -> BrokerMsg {
        BrokerMsg::Activate {
            features,
            queues: vec![],
            epoch: features,
        }
    }

    #[test]
    fn a_storm_collapses_to_the_latest_state() {
        let mut o = Outbox::default();
        for i in 0..10_000u64 {
            o.push(BrokerMsg::Reset);
            o.push(BrokerMsg::ConfigWrite {
                offset: 32,
                data: vec![i as u8],
            });
            o.push(activate(i));
            o.push(BrokerMsg::StopQueue { index: 0 });
        }
        assert_eq!(
            drain(&mut o),
            [
                BrokerMsg::Reset,
                BrokerMsg::ConfigWrite {
                    offset: 32,
                    data: vec![(9_999u64 & 0xff) as u8]
                },
                activate(9_999),
                BrokerMsg::StopQueue { index: 0 },
            ]
        );
        assert!(o.is_empty());
    }

    #[test]
    fn rate_limits_keep_the_latest_per_flow_and_survive_a_reset() {
        let mut o = Outbox::default();
        let limit = |rate| Limit {
            bytes: protocol::Bucket::new(rate, None).ok(),
            ops: None,
        };
        o.push(activate(1));
        for rate in 1..1000 {
            o.push(BrokerMsg::RateLimit {
                flow: Flow::Tx,
                limit: limit(rate),
            });
        }
        o.push(BrokerMsg::RateLimit {
            flow: Flow::Rx,
            limit: Limit::default(),
        });
        o.push(BrokerMsg::Reset);
        assert_eq!(
            drain(&mut o),
            [
                BrokerMsg::Reset,
                BrokerMsg::RateLimit {
                    flow: Flow::Rx,
                    limit: Limit::default()
                },
                BrokerMsg::RateLimit {
                    flow: Flow::Tx,
                    limit: limit(999)
                },
            ]
        );
    }

    #[test]
    fn a_reset_overtakes_what_it_undoes() {
        let mut o = Outbox::default();
        o.push(activate(1));
        o.push(BrokerMsg::StopQueue { index: 1 });
        o.push(BrokerMsg::Reset);
        assert_eq!(drain(&mut o), [BrokerMsg::Reset]);
        o.push(activate(2));
        assert_eq!(drain(&mut o), [activate(2)]);
    }
}
