//! Zones at run time: `zone add`, `zone remove`, `zone list` on the control socket and SIGHUP.
//!
//! hvisor starts and stops zones while the root zone runs, so the broker takes zones in and
//! lets them go without touching the others. Nothing here waits inside the bridge loop:
//!
//! - Adding validates the new zones against the running ones with the config crate's own
//!   checks ([`config::load_addition`]), opens every device's resources first and adds
//!   nothing if one fails, then starts the workers (which report Ready on their own).
//! - Removing stops routing the zone's addresses at once (its devices then read 0 and ignore
//!   writes, like any address no device has, so no vCPU waits), takes the devices' fds out of
//!   epoll, asks the workers to stop and keeps the devices here, [`Retiring`], until SIGCHLD
//!   has reaped every worker (killed after [`STOP_TIME`]). Only then are the image locks,
//!   taps, ptys and `pty_link`s released: a new zone never writes an image an old worker
//!   still may. A `zone remove` is answered at that moment.
//! - Removing renumbers the devices behind the removed ones (their epoll tokens name their
//!   index), so it runs only between batches of events.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use config::{Config, Zone};
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use protocol::BrokerMsg;
use serde_json::{json, Value};

use crate::serve::{dev_token, regions, relay_token, Broker, Slot, CALL_EVENTS};
use crate::{control, devices, supervisor};

/// How long a removed zone's workers have to stop before they are killed.
pub const STOP_TIME: Duration = Duration::from_secs(1);

/// What follows once a removed zone's workers have all ended.
pub enum Then {
    Nothing,
    /// Answer the `zone remove` that asked for it.
    Reply(OwnedFd),
    /// SIGHUP changed the zone: serve its new definition, or the old one again if the new
    /// cannot be.
    Readd {
        new: Box<Zone>,
        old: Box<Zone>,
    },
}

/// A removed zone whose workers are still ending, with everything they may still use.
pub struct Retiring {
    zone: u32,
    slots: Vec<Slot>,
    since: Instant,
    then: Then,
}

/// Kills the workers of removed zones that have not stopped by `now`.
pub fn tick(retiring: &mut [Retiring], now: Instant) {
    for r in retiring.iter().filter(|r| now - r.since > STOP_TIME) {
        for w in r.slots.iter().filter_map(|s| s.worker.as_ref()) {
            let _ = kill(w.pid, Signal::SIGKILL);
        }
    }
}

/// The running zones: ids, and which of them differ from `wanted` or are missing there.
struct Diff {
    removed: Vec<Zone>,
    changed: Vec<(Zone, Zone)>,
    added: Vec<Zone>,
}

fn diff(running: &Config, wanted: &Config) -> Diff {
    let find = |c: &Config, id| c.zones.iter().find(|z| z.id == id).cloned();
    let mut d = Diff {
        removed: Vec::new(),
        changed: Vec::new(),
        added: Vec::new(),
    };
    for old in &running.zones {
        match find(wanted, old.id) {
            None => d.removed.push(old.clone()),
            Some(new) if new != *old => d.changed.push((old.clone(), new)),
            Some(_) => {}
        }
    }
    for new in &wanted.zones {
        if find(running, new.id).is_none() {
            d.added.push(new.clone());
        }
    }
    d
}

fn ids(zones: &[Zone]) -> String {
    let ids: Vec<String> = zones.iter().map(|z| z.id.to_string()).collect();
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}

impl Broker {
    /// `zone add PATH`: validates the file's zones against the running ones and serves them.
    /// An error leaves everything as it was.
    pub(crate) fn add_zones_from(&mut self, path: &Path) -> Result<String> {
        let loaded = config::load_addition(path, &self.config).map_err(|e| {
            anyhow::anyhow!(
                "{}: invalid configuration (nothing changed):\n{e}",
                path.display()
            )
        })?;
        for w in &loaded.warnings {
            log::warn!("{}: {w}", path.display());
        }
        let zones = loaded.config.zones;
        if let Some(r) = (self.retiring.iter()).find(|r| zones.iter().any(|z| z.id == r.zone)) {
            bail!("zone {} is still being removed; nothing changed", r.zone);
        }
        let devices: usize = zones.iter().map(|z| z.devices.len()).sum();
        self.add_zones(&zones)
            .with_context(|| format!("{}: nothing changed", path.display()))?;
        let message = format!("zone(s) {} added: {devices} device(s)", ids(&zones));
        log::info!("{message} from {}", path.display());
        Ok(message)
    }

    /// Opens every device of `zones` (releasing all if one fails), then starts their
    /// workers; if one cannot be started, the zones are removed again.
    fn add_zones(&mut self, zones: &[Zone]) -> Result<()> {
        let Some(run) = self.control.as_ref().map(|c| c.run_dir()) else {
            bail!("no run directory to keep image locks in");
        };
        let mut prepared = Vec::new();
        for zone in zones {
            for dev in &zone.devices {
                prepared.push((zone, dev, devices::prepare(dev, run)?));
            }
        }
        let mut started = Ok(());
        for (zone, dev, prep) in prepared {
            started = self.add_device(dev, prep, regions(zone));
            if started.is_err() {
                break;
            }
        }
        if let Err(e) = started {
            for zone in zones {
                self.take_zone(zone.id, Then::Nothing);
            }
            return Err(e);
        }
        self.config.zones.extend(zones.iter().cloned());
        self.publish_addresses();
        Ok(())
    }

    /// Stops serving `zone`; `then` follows once its workers have ended. Gives `then` back
    /// when no such zone is served.
    pub(crate) fn remove_zone(&mut self, zone: u32, then: Then) -> Result<(), OwnedFd> {
        if !self.config.zones.iter().any(|z| z.id == zone) {
            return match then {
                Then::Reply(conn) => Err(conn),
                _ => Ok(()),
            };
        }
        log::info!("zone {zone}: removing; its devices are no longer served");
        self.take_zone(zone, then);
        Ok(())
    }

    /// Takes the devices of `zone` out of service and keeps them until their workers end.
    fn take_zone(&mut self, zone: u32, then: Then) {
        self.config.zones.retain(|z| z.id != zone);
        let Some(first) = self.slots.iter().position(|s| s.zone == zone) else {
            self.retiring.push(Retiring {
                zone,
                slots: Vec::new(),
                since: Instant::now(),
                then,
            });
            return self.finish_retired();
        };
        let (gone, kept): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut self.slots)
            .into_iter()
            .partition(|s| s.zone == zone);
        self.slots = kept;
        for slot in &gone {
            self.opts.readiness.device_gone((slot.zone, slot.base));
            self.unwatch(slot);
            if let Some(w) = slot.worker.as_ref().filter(|w| w.gone_since.is_none()) {
                let _ = w.channel.send(&BrokerMsg::Shutdown, &[], true);
            }
        }
        for i in first..self.slots.len() {
            self.rewatch(i);
        }
        self.publish_addresses();
        self.retiring.push(Retiring {
            zone,
            slots: gone,
            since: Instant::now(),
            then,
        });
        self.finish_retired();
    }

    /// Removes a device's fds from epoll before they can be closed: a late event would name
    /// a token that now belongs to another device.
    fn unwatch(&self, slot: &Slot) {
        if let Some(w) = &slot.worker {
            self.epoll.delete(w.channel.as_fd()).ok();
        }
        for c in &slot.calls {
            self.epoll.delete(c.as_fd()).ok();
        }
        for fd in slot.relay.iter().flat_map(|r| r.fds()) {
            self.epoll.delete(fd).ok();
        }
    }

    /// Device `i` moved to index `i`: its fds get the tokens of that index (those not
    /// watched stay so).
    fn rewatch(&self, i: usize) {
        let slot = &self.slots[i];
        let token = dev_token(i);
        if let Some(w) = slot.worker.as_ref().filter(|w| w.gone_since.is_none()) {
            let mut flags = EpollFlags::EPOLLIN;
            if slot.watching_out {
                flags |= EpollFlags::EPOLLOUT;
            }
            let mut ev = EpollEvent::new(flags, token);
            self.epoll.modify(w.channel.as_fd(), &mut ev).ok();
        }
        for (q, c) in slot.calls.iter().enumerate() {
            let mut ev = EpollEvent::new(CALL_EVENTS, token + 1 + q as u64);
            self.epoll.modify(c.as_fd(), &mut ev).ok();
        }
        if let Some(relay) = &slot.relay {
            for (j, fd) in relay.fds().into_iter().enumerate() {
                let mut ev = EpollEvent::new(relay.registered[j], relay_token(i) + j as u64);
                self.epoll.modify(fd, &mut ev).ok();
            }
        }
    }

    /// A child that is no device's current worker ended: if it was a removed zone's, that
    /// zone may now be released.
    pub(crate) fn retired_exit(&mut self, pid: Pid, status: &WaitStatus) {
        for r in &mut self.retiring {
            for slot in &mut r.slots {
                if slot.worker.as_ref().is_some_and(|w| w.pid == pid) {
                    // Dropping it frees its ids and cgroup.
                    slot.worker = None;
                    let how = supervisor::describe_exit(status);
                    log::info!("{} worker (pid {pid}) {how} (zone removed)", slot.label);
                }
            }
        }
        self.finish_retired();
    }

    /// Releases every removed zone whose workers have all ended, and does what follows.
    fn finish_retired(&mut self) {
        let (done, waiting): (Vec<Retiring>, Vec<Retiring>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|r| r.slots.iter().all(|s| s.worker.is_none()));
        self.retiring = waiting;
        for r in done {
            let devices = r.slots.len();
            // Image locks, taps, ptys and their links, queue and record fds go here.
            drop(r.slots);
            let message = format!("zone {} removed: {devices} device(s) released", r.zone);
            log::info!("{message}");
            match r.then {
                Then::Nothing => {}
                Then::Reply(conn) => {
                    if let Some(c) = &self.control {
                        c.reply(conn, &control::action_answer(true, &message));
                    }
                }
                Then::Readd { new, old } => self.readd(&new, &old),
            }
        }
    }

    /// Serves a zone SIGHUP changed: the new definition, or else the old one again.
    fn readd(&mut self, new: &Zone, old: &Zone) {
        match self.add_zones(std::slice::from_ref(new)) {
            Ok(()) => log::info!("SIGHUP: zone {} added again as changed", new.id),
            Err(e) => {
                log::error!(
                    "SIGHUP: zone {} as changed cannot be served ({e:#}); serving it as before",
                    new.id
                );
                if let Err(e) = self.add_zones(std::slice::from_ref(old)) {
                    log::error!("SIGHUP: zone {} cannot be served again: {e:#}", old.id);
                }
            }
        }
    }

    /// SIGHUP: reads the start configuration again and applies the difference. A
    /// configuration that is not valid, or a new zone that cannot be opened, changes nothing.
    pub(crate) fn reload(&mut self) {
        let Some(path) = self.opts.config_path.clone() else {
            log::warn!("SIGHUP: no configuration file to read again; ignored");
            return;
        };
        let wanted = match config::load(&path) {
            Ok(loaded) => loaded.config,
            Err(e) => {
                log::error!(
                    "SIGHUP: {}: invalid configuration, nothing changed:\n{e}",
                    path.display()
                );
                return;
            }
        };
        let d = diff(&self.config, &wanted);
        if d.removed.is_empty() && d.changed.is_empty() && d.added.is_empty() {
            log::info!("SIGHUP: {}: no zone changed", path.display());
            return;
        }
        log::info!(
            "SIGHUP: {}: zones added: {}; removed: {}; changed: {}",
            path.display(),
            ids(&d.added),
            ids(&d.removed),
            ids(&d.changed.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>()),
        );
        // The file as a whole was validated; the running zones that stay are part of it.
        let added = if d.added.is_empty() {
            Ok(())
        } else {
            self.add_zones(&d.added)
        };
        if let Err(e) = added {
            log::error!("SIGHUP: the new zones cannot be served, nothing changed: {e:#}");
            return;
        }
        for zone in d.removed {
            self.take_zone(zone.id, Then::Nothing);
        }
        for (old, new) in d.changed {
            let then = Then::Readd {
                new: Box::new(new),
                old: Box::new(old.clone()),
            };
            self.take_zone(old.id, then);
        }
    }

    /// `zone list`: every zone with its devices and their workers.
    pub(crate) fn zone_list(&self) -> Value {
        let device = |s: &Slot| {
            let state = match &s.worker {
                Some(w) if w.gone_since.is_some() => "worker ending",
                Some(w) if w.ready => "serving",
                Some(_) => "starting",
                None if s.life.restart_at.is_some() => "restarting",
                None => "failed",
            };
            json!({
                "device": format!("{}@{:#x}", s.kind, s.base),
                "irq": s.irq,
                "worker_pid": s.worker.as_ref().map(|w| w.pid.as_raw()),
                "state": state,
            })
        };
        let mut zones: Vec<Value> = (self.config.zones.iter())
            .map(|z| {
                let devs = self.slots.iter().filter(|s| s.zone == z.id).map(device);
                json!({ "zone": z.id, "state": "served", "devices": devs.collect::<Vec<_>>() })
            })
            .collect();
        zones.extend(self.retiring.iter().map(|r| {
            let devs = r.slots.iter().map(device);
            json!({ "zone": r.zone, "state": "removing", "devices": devs.collect::<Vec<_>>() })
        }));
        json!({ "broker_pid": std::process::id(), "zones": zones })
    }
}

/// `hvisor-broker zone list` as text.
pub fn render_list(list: &Value) -> String {
    let mut out = String::new();
    for z in list["zones"].as_array().into_iter().flatten() {
        out.push_str(&format!("zone {}: {}\n", z["zone"], str_of(&z["state"])));
        for d in z["devices"].as_array().into_iter().flatten() {
            let pid = d["worker_pid"]
                .as_i64()
                .map(|p| format!(", worker pid {p}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {:<20} irq {:<4} {}{pid}\n",
                str_of(&d["device"]),
                d["irq"].to_string(),
                str_of(&d["state"])
            ));
        }
    }
    out
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(id: u32, size: u64) -> Zone {
        Zone {
            id,
            memory: vec![config::MemRegion {
                zone0_ipa: 0x1000_0000 * u64::from(id),
                zonex_ipa: 0x1000_0000,
                size,
            }],
            devices: Vec::new(),
        }
    }

    #[test]
    fn a_reload_adds_removes_and_replaces_what_changed() {
        let running = Config {
            zones: vec![zone(1, 0x1000), zone(2, 0x1000), zone(3, 0x1000)],
        };
        let wanted = Config {
            zones: vec![zone(1, 0x1000), zone(3, 0x2000), zone(4, 0x1000)],
        };
        let d = diff(&running, &wanted);
        assert_eq!(ids(&d.removed), "2");
        assert_eq!(ids(&d.added), "4");
        assert_eq!(d.changed.len(), 1);
        assert_eq!(
            (d.changed[0].0.id, d.changed[0].1.memory[0].size),
            (3, 0x2000)
        );
        let none = diff(&running, &running);
        assert!(none.removed.is_empty() && none.changed.is_empty() && none.added.is_empty());
    }

    #[test]
    fn the_list_reads_as_text() {
        let list = json!({ "zones": [
            { "zone": 1, "state": "served", "devices": [
                { "device": "blk@0xa003c00", "irq": 78, "worker_pid": 42, "state": "serving" }] },
            { "zone": 2, "state": "removing", "devices": [
                { "device": "console@0xa003800", "irq": 76, "worker_pid": null, "state": "failed" }] },
        ]});
        assert_eq!(
            render_list(&list),
            "zone 1: served\n  blk@0xa003c00        irq 78   serving, worker pid 42\n\
             zone 2: removing\n  console@0xa003800    irq 76   failed\n"
        );
    }
}
