//! Control messages waiting for room in a worker's socket. A guest can change its device's
//! state faster than a worker reads (a reset loop, a storm of config writes), so what waits
//! is the state the worker must reach, not the history: a reset drops the activation and
//! queue stops it overtakes, and the latest bytes written at a config offset win. What waits
//! is bounded by the device (its config size, its queues) whatever the guest does.

use std::collections::{BTreeMap, BTreeSet};

use protocol::{BrokerMsg, QueueConfig};

#[derive(Default)]
pub struct Outbox {
    reset: bool,
    config: BTreeMap<u32, Vec<u8>>,
    activate: Option<(u64, Vec<QueueConfig>, u64)>,
    stop: BTreeSet<u16>,
}

impl Outbox {
    /// Merges `msg` into what waits. Only control messages (reset, activate, config writes,
    /// queue stops) are expected.
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
            other => log::debug!("{other:?} is not a control message; not queued"),
        }
    }

    /// The next message to send: the reset, config writes, the activation, then queue stops.
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
