//! virtio-console guests: `console-verify` and `console-bench`.
//!
//! Both talk to a host program on the other end of the pty (the end-to-end test, the bench
//! harness) through the console itself, in turns: the guest writes a control line, the host
//! answers as the line asks. The protocol is described in the crate documentation.
//!
//! The stock `VirtIOConsole` of virtio-drivers keeps one receive buffer and waits for each
//! transmit by spinning on the used ring, so it serves the size check and a greeting only. The
//! rest goes through [`Port`], a driver of our own on `virtio_drivers::queue::VirtQueue` that
//! keeps up to a queue's worth of chains in flight, decides exactly when receive buffers are
//! offered, and waits for the device's interrupt as a guest kernel does.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::{Error, Hal};

use super::{GuestDev, IrqWaiter, Rng};
use crate::layout::DevKind;
use crate::report::DeviceReport;
use crate::transport::SimTransport;

/// Feature bits (virtio 1.2, 5.3.3 and 6).
pub mod feat {
    pub const SIZE: u64 = 1 << 0;
    pub const MULTIPORT: u64 = 1 << 1;
    pub const EMERG_WRITE: u64 = 1 << 2;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// What [`Port`] asks for: no MULTIPORT (one port, so no control queues).
pub const WANTED: u64 = feat::VERSION_1 | feat::SIZE | feat::INDIRECT_DESC | feat::EVENT_IDX;

const RXQ: u16 = 0;
const TXQ: u16 = 1;
/// The device's QueueNumMax: as many chains in flight as it allows.
const QUEUE_SIZE: usize = 256;
const MIB: usize = 1 << 20;

/// The bytes of a transfer: the little-endian bytes of the splitmix64 stream seeded with
/// `seed` (what [`Rng::fill`] makes), so the host can produce and check them independently.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// A transmit chain in flight: the device reads its parts, in order.
struct TxChain {
    token: u16,
    parts: Vec<Vec<u8>>,
}

/// A receive buffer in flight.
struct RxBuf {
    token: u16,
    buf: Vec<u8>,
}

/// Counters of one [`Port`].
#[derive(Default, Debug, Clone)]
pub struct PortStats {
    pub tx_chains: u64,
    pub tx_bytes: u64,
    pub rx_chains: u64,
    pub rx_bytes: u64,
    /// Completions found only after an interrupt wait timed out.
    pub missed_interrupts: u64,
}

/// A virtio-console driver for port 0 on `VirtQueue`s.
pub struct Port<'a, H: Hal> {
    t: SimTransport<'a>,
    rxq: VirtQueue<H, QUEUE_SIZE>,
    txq: VirtQueue<H, QUEUE_SIZE>,
    tx: VecDeque<TxChain>,
    rx: VecDeque<RxBuf>,
    /// Bytes of the receive buffers in flight.
    rx_posted: usize,
    /// Received and not yet consumed.
    input: VecDeque<u8>,
    pub device_features: u64,
    pub negotiated: u64,
    /// `struct virtio_console_config`: cols, rows, max_nr_ports.
    pub cols: u16,
    pub rows: u16,
    pub max_nr_ports: u32,
    pub stats: PortStats,
}

impl<'a, H: Hal> Port<'a, H> {
    /// Resets the device (Status 0) and initialises it from scratch (virtio 3.1.1).
    pub fn init(mut t: SimTransport<'a>, wanted: u64) -> Result<Self> {
        let (device_features, negotiated) = t.negotiate(wanted)?;
        let (cols, rows, max_nr_ports) = t
            .read_consistent(|| {
                Ok((
                    t.read_config_space::<u16>(0)?,
                    t.read_config_space::<u16>(2)?,
                    t.read_config_space::<u32>(4)?,
                ))
            })
            .context("reading the config space")?;
        let indirect = negotiated & feat::INDIRECT_DESC != 0;
        let event_idx = negotiated & feat::EVENT_IDX != 0;
        let rxq = VirtQueue::new(&mut t, RXQ, indirect, event_idx).context("receiveq0")?;
        let txq = VirtQueue::new(&mut t, TXQ, indirect, event_idx).context("transmitq0")?;
        t.driver_ok();
        Ok(Port {
            t,
            rxq,
            txq,
            tx: VecDeque::new(),
            rx: VecDeque::new(),
            rx_posted: 0,
            input: VecDeque::new(),
            device_features,
            negotiated,
            cols,
            rows,
            max_nr_ports,
            stats: PortStats::default(),
        })
    }

    /// Receive buffers in flight.
    pub fn rx_in_flight(&self) -> usize {
        self.rx.len()
    }

    /// Completes every finished chain of both queues; returns how many.
    fn reap(&mut self) -> Result<usize> {
        let mut n = 0;
        loop {
            // Pairs with the device's fence between publishing `used.idx` and reading
            // `used_event`: either we see its entry or it sees our new `used_event`.
            fence(Ordering::SeqCst);
            let mut progress = false;
            if let Some(token) = self.txq.peek_used() {
                let c = self
                    .tx
                    .pop_front()
                    .context("the device completed a transmit chain never offered")?;
                ensure!(
                    token == c.token,
                    "transmit chains completed out of order (token {token}, expected {})",
                    c.token
                );
                let inputs: Vec<&[u8]> = c.parts.iter().map(Vec::as_slice).collect();
                // SAFETY: the same buffers as passed to `add` for this token, untouched since.
                unsafe { self.txq.pop_used(token, &inputs, &mut []) }?;
                self.stats.tx_chains += 1;
                progress = true;
            }
            if let Some(token) = self.rxq.peek_used() {
                let mut b = self
                    .rx
                    .pop_front()
                    .context("the device completed a receive buffer never offered")?;
                ensure!(
                    token == b.token,
                    "receive buffers completed out of order (token {token}, expected {})",
                    b.token
                );
                // SAFETY: the same buffer as passed to `add` for this token, untouched since.
                let len = unsafe { self.rxq.pop_used(token, &[], &mut [b.buf.as_mut_slice()]) }?;
                self.rx_posted -= b.buf.len();
                let len = len as usize;
                ensure!(
                    len <= b.buf.len(),
                    "the device used {len} bytes of a {}-byte receive buffer",
                    b.buf.len()
                );
                self.input.extend(&b.buf[..len]);
                self.stats.rx_chains += 1;
                self.stats.rx_bytes += len as u64;
                progress = true;
            }
            if !progress {
                return Ok(n);
            }
            n += 1;
        }
    }

    /// Waits for the device's interrupt, acknowledges it, and completes what finished.
    fn wait(&mut self, irq: &mut IrqWaiter, what: &str) -> Result<()> {
        if irq.wait() {
            self.t.read_isr_and_ack();
            self.reap()?;
            irq.eoi();
            return Ok(());
        }
        if self.reap()? > 0 {
            self.stats.missed_interrupts += 1;
            return Ok(());
        }
        bail!(
            "{what}: nothing from the device within {:?} ({} transmit chains and {} receive \
             buffers in flight){}",
            irq.timeout(),
            self.tx.len(),
            self.rx.len(),
            if irq.broker_gone() {
                " (the broker went away)"
            } else {
                ""
            }
        )
    }

    /// Offers one transmit chain; false if the queue has no room.
    fn offer(&mut self, parts: Vec<Vec<u8>>) -> Result<bool> {
        let inputs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        // SAFETY: the parts move into `self.tx` (their heap storage stays put) and are touched
        // again only by `pop_used` with this token.
        match unsafe { self.txq.add(&inputs, &mut []) } {
            Ok(token) => {
                self.stats.tx_bytes += parts.iter().map(|p| p.len() as u64).sum::<u64>();
                self.tx.push_back(TxChain { token, parts });
                Ok(true)
            }
            Err(Error::QueueFull) => Ok(false),
            Err(e) => bail!("offering a transmit chain: {e}"),
        }
    }

    /// Writes `data` as transmit chains, up to `depth` in flight, and returns once the device
    /// has completed them all. `shape` gives each chain's part sizes for what is left.
    pub fn write_all(
        &mut self,
        irq: &mut IrqWaiter,
        data: &[u8],
        depth: usize,
        mut shape: impl FnMut(usize) -> Vec<usize>,
    ) -> Result<()> {
        let mut at = 0;
        while at < data.len() || !self.tx.is_empty() {
            let mut notify = false;
            while at < data.len() && self.tx.len() < depth {
                let sizes = shape(data.len() - at);
                let mut parts = Vec::with_capacity(sizes.len());
                let mut next = at;
                for n in sizes {
                    let n = n.clamp(1, data.len() - next);
                    parts.push(data[next..next + n].to_vec());
                    next += n;
                    if next == data.len() {
                        break;
                    }
                }
                if !self.offer(parts)? {
                    break;
                }
                at = next;
                // Asked after every chain: virtio-drivers compares the indices without
                // wrapping, which is only exact for the chain that crosses `avail_event`.
                notify |= self.txq.should_notify();
            }
            if notify {
                self.t.notify(TXQ);
            }
            if self.reap()? == 0 {
                self.wait(irq, "transmit")?;
            }
        }
        Ok(())
    }

    pub fn write_line(&mut self, irq: &mut IrqWaiter, line: &str) -> Result<()> {
        self.write_all(irq, format!("{line}\n").as_bytes(), 1, |left| vec![left])
    }

    /// Offers receive buffers of up to `buf` bytes, up to `depth` in flight, while the bytes
    /// offered stay within `budget`: the device can never deliver more than was asked for, so
    /// the rest of the host's input stays in the pty.
    fn offer_rx(&mut self, budget: usize, buf: usize, depth: usize) -> Result<()> {
        let mut notify = false;
        while self.rx.len() < depth && self.rx_posted < budget {
            let mut b = vec![0u8; buf.min(budget - self.rx_posted)];
            // SAFETY: the buffer moves into `self.rx` (its heap storage stays put) and is
            // touched again only by `pop_used` with this token.
            let token = match unsafe { self.rxq.add(&[], &mut [b.as_mut_slice()]) } {
                Ok(t) => t,
                Err(Error::QueueFull) => break,
                Err(e) => bail!("offering a receive buffer: {e}"),
            };
            self.rx_posted += b.len();
            self.rx.push_back(RxBuf { token, buf: b });
            notify |= self.rxq.should_notify();
        }
        if notify {
            self.t.notify(RXQ);
        }
        Ok(())
    }

    /// The next `n` bytes from the host.
    pub fn read_exact(
        &mut self,
        irq: &mut IrqWaiter,
        n: usize,
        buf: usize,
        depth: usize,
    ) -> Result<Vec<u8>> {
        while self.input.len() < n {
            self.offer_rx(n - self.input.len(), buf, depth)?;
            if self.reap()? == 0 {
                let what = format!("receive ({} of {n} bytes)", self.input.len());
                self.wait(irq, &what)?;
            }
        }
        Ok(self.input.drain(..n).collect())
    }

    /// The next line from the host, without its newline.
    pub fn read_line(&mut self, irq: &mut IrqWaiter) -> Result<String> {
        loop {
            if let Some(end) = self.input.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.input.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            ensure!(self.input.len() < 4096, "a line of more than 4 KiB");
            // One small buffer at a time: a line is short, and input after it is left alone.
            self.offer_rx(256, 256, 1)?;
            if self.reap()? == 0 {
                self.wait(irq, "waiting for a line")?;
            }
        }
    }
}

impl<H: Hal> Drop for Port<'_, H> {
    fn drop(&mut self) {
        // Reset before the rings are freed, so the device stops looking at them.
        self.t.set_status(DeviceStatus::empty());
    }
}

/// The cols x rows the configuration gives the device.
fn configured_size(g: &GuestDev<'_>) -> Result<(u16, u16)> {
    match g.spec.kind {
        DevKind::Console { cols, rows } => Ok((cols, rows)),
        _ => bail!("not a console device"),
    }
}

/// An answer `HVC GOT <len> ok` to a transfer of `len` bytes; the reason otherwise.
fn got_ok(line: &str, len: usize) -> Result<(), String> {
    let want = format!("HVC GOT {len} ok");
    if line == want {
        Ok(())
    } else {
        Err(format!("the host answered {line:?}, not {want:?}"))
    }
}

/// Sends a transfer (`HVC <verb> <len> <seed>` and the bytes) and records the host's answer as
/// check `name`.
#[allow(clippy::too_many_arguments)]
fn send_checked<H: Hal>(
    port: &mut Port<'_, H>,
    irq: &mut IrqWaiter,
    rep: &mut DeviceReport,
    name: &str,
    verb: &str,
    seed: u64,
    len: usize,
    rng: &mut Rng,
) -> Result<()> {
    let data = pattern(seed, len);
    let start = Instant::now();
    port.write_line(irq, &format!("HVC {verb} {len} {seed}"))?;
    // Chains of 1 byte to 16 KiB in one to three parts, up to a full queue in flight.
    port.write_all(irq, &data, QUEUE_SIZE, |left| {
        let n = (rng.range(1, 16 * 1024) as usize).min(left);
        let parts = rng.range(1, 3.min(n as u64)) as usize;
        let mut sizes = vec![n / parts; parts];
        sizes[0] += n % parts;
        sizes
    })?;
    let sent = start.elapsed();
    let answer = port.read_line(irq)?;
    let elapsed = start.elapsed();
    match got_ok(&answer, len) {
        Ok(()) => rep.check(
            name,
            true,
            format!(
                "{len} bytes written in {:.3} s, the host read them all byte-exact ({:.3} s \
                 until its answer)",
                sent.as_secs_f64(),
                elapsed.as_secs_f64()
            ),
        ),
        Err(why) => rep.check(name, false, why),
    };
    rep.writes += 1;
    Ok(())
}

/// The demo: greet on the console; the host reads it from the broker's pty.
pub fn demo<H: Hal>(g: &mut GuestDev, rep: &mut DeviceReport) -> Result<()> {
    let (cols, rows) = configured_size(g)?;
    let spec = g.spec;
    let label = format!("[zone {} console@{:#x}]", g.zone(), spec.addr);
    let t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    let mut port = Port::<H>::init(t, WANTED).context("virtio-console driver initialisation")?;
    println!("{label} found virtio-console: {cols}x{rows}");
    let lines = [
        format!(
            "hello from zone {}: this line went guest -> broker -> sandboxed worker -> pty",
            g.zone()
        ),
        "the console keeps its output while nobody reads it".to_string(),
    ];
    for l in &lines {
        port.write_line(&mut g.irq, l)?;
        println!("{label} wrote: {l}");
    }
    rep.check("console_greeting", true, "greeting written");
    Ok(())
}

pub fn verify<H: Hal>(g: &mut GuestDev, rep: &mut DeviceReport) -> Result<()> {
    let (cols, rows) = configured_size(g)?;
    let spec = g.spec;
    let seed = g.opts.seed ^ spec.addr ^ ((g.zone() as u64) << 48);
    let mut rng = Rng::new(seed);

    // The stock driver: what it negotiates, the size, a greeting.
    let mut t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    rep.features.device = t.read_device_features();
    let mut stock = VirtIOConsole::<H, _>::new(t).context("stock driver initialisation")?;
    let size = stock.size().context("stock driver: size")?;
    let size_ok = size.is_some_and(|s| (s.columns, s.rows) == (cols, rows));
    rep.check(
        "size_stock",
        size_ok,
        format!("VirtIOConsole::size() = {size:?}; the configuration says {cols}x{rows}"),
    );
    let hello = format!("hvisor-console-verify hello {cols}x{rows}\n");
    stock
        .send_bytes(hello.as_bytes())
        .context("stock driver: sending the greeting")?;
    // The stock driver spins on the used ring; take the interrupt that came meanwhile.
    if g.irq.wait_for(Duration::ZERO) {
        let _ = stock.ack_interrupt();
        g.irq.eoi();
    }
    drop(stock);

    let t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    let mut port = Port::<H>::init(t, WANTED).context("own driver initialisation")?;
    rep.features.own = port.negotiated;
    let required = feat::VERSION_1 | feat::SIZE;
    rep.check(
        "features",
        port.device_features & required == required
            && port.device_features & (feat::MULTIPORT | feat::EMERG_WRITE) == 0,
        format!(
            "device offers 0x{:x}, driver accepted 0x{:x}",
            port.device_features, port.negotiated
        ),
    );
    rep.check(
        "config_space",
        (port.cols, port.rows, port.max_nr_ports) == (cols, rows, 1),
        format!(
            "cols {} rows {} max_nr_ports {}; expected {cols} {rows} 1",
            port.cols, port.rows, port.max_nr_ports
        ),
    );
    let irq = &mut g.irq;

    send_checked(
        &mut port,
        irq,
        rep,
        "tx_1mib",
        "TX",
        rng.next_u64() >> 1,
        MIB,
        &mut rng,
    )?;
    send_checked(
        &mut port,
        irq,
        rep,
        "tx_1mib_slow_reader",
        "SLOWTX",
        rng.next_u64() >> 1,
        MIB,
        &mut rng,
    )?;

    // Host to guest, first with no receive buffer at all for a while: the input must wait in
    // the pty, not be read and dropped.
    let rx_seed = rng.next_u64() >> 1;
    ensure!(port.rx_in_flight() == 0, "receive buffers left over");
    port.write_line(irq, &format!("HVC RX {MIB} {rx_seed}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let got = port.read_exact(irq, MIB, 4096, 64)?;
    let want = pattern(rx_seed, MIB);
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    rep.check(
        "rx_1mib",
        first_diff.is_none(),
        match first_diff {
            None => format!(
                "{MIB} bytes byte-exact in {:.3} s, after 300 ms without receive buffers",
                start.elapsed().as_secs_f64()
            ),
            Some(i) => format!(
                "first difference at byte {i} (got 0x{:02x}, expected 0x{:02x})",
                got[i], want[i]
            ),
        },
    );
    rep.reads += 1;
    rep.verified_bytes += if first_diff.is_none() { MIB as u64 } else { 0 };

    // The reader goes away; what the guest writes meanwhile is seen once it is back.
    port.write_line(irq, "HVC DETACH")?;
    let line = port.read_line(irq)?;
    ensure!(
        line == "HVC DETACHING",
        "the host answered {line:?} to DETACH"
    );
    send_checked(
        &mut port,
        irq,
        rep,
        "detach_reattach",
        "AFTER",
        rng.next_u64() >> 1,
        256 * 1024,
        &mut rng,
    )?;

    // An idle console with a receive buffer waiting: the host measures the worker meanwhile.
    port.write_line(irq, "HVC IDLE")?;
    let line = port.read_line(irq)?;
    rep.check(
        "idle_wakeup",
        line == "HVC BYE",
        format!("after the idle pause the host wrote {line:?}"),
    );
    rep.missed_interrupts = port.stats.missed_interrupts;
    rep.check(
        "interrupts",
        port.stats.missed_interrupts == 0,
        format!(
            "{} transmit chains and {} receive buffers completed, {} found without an interrupt",
            port.stats.tx_chains, port.stats.rx_chains, port.stats.missed_interrupts
        ),
    );
    port.write_line(irq, "HVC DONE")?;
    println!(
        "hvisor-sim: zone {} console@0x{:x}: {} bytes out, {} bytes in",
        g.vcpu.zone(),
        spec.addr,
        port.stats.tx_bytes,
        port.stats.rx_bytes
    );
    Ok(())
}

/// Bytes moved each way by `console-bench`.
const BENCH_BYTES: usize = 64 * MIB;

pub fn bench<H: Hal>(g: &mut GuestDev, rep: &mut DeviceReport) -> Result<()> {
    let spec = g.spec;
    let t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    let mut port = Port::<H>::init(t, WANTED).context("driver initialisation")?;
    rep.features.own = port.negotiated;
    let irq = &mut g.irq;
    let n = BENCH_BYTES;

    // Guest to host: 16 KiB chains, a full queue in flight. Timed until the device has
    // completed them all, i.e. until everything but what the pty buffers reached the host.
    let tx_seed = g.opts.seed;
    let data = pattern(tx_seed, n);
    port.write_line(irq, &format!("HVC BENCH-TX {n} {tx_seed}"))?;
    let start = Instant::now();
    port.write_all(irq, &data, QUEUE_SIZE, |left| vec![left.min(16 * 1024)])?;
    let tx_secs = start.elapsed().as_secs_f64();
    let answer = port.read_line(irq)?;
    let tx_ok = got_ok(&answer, n);

    // Host to guest: 4 KiB receive buffers, a full queue of them offered.
    let rx_seed = g.opts.seed + 1;
    port.write_line(irq, &format!("HVC BENCH-RX {n} {rx_seed}"))?;
    let start = Instant::now();
    let got = port.read_exact(irq, n, 4096, QUEUE_SIZE)?;
    let rx_secs = start.elapsed().as_secs_f64();
    let rx_ok = got == pattern(rx_seed, n);
    port.write_line(irq, "HVC DONE")?;
    rep.writes = port.stats.tx_chains;
    rep.reads = port.stats.rx_chains;
    rep.missed_interrupts = port.stats.missed_interrupts;
    drop(port);

    let (base_tx, base_rx) = baseline(&data).context("pty copy baseline")?;
    let mb = |secs: f64| n as f64 / secs / 1e6;
    let rows = [
        ("guest -> host", mb(tx_secs), base_tx),
        ("host -> guest", mb(rx_secs), base_rx),
    ];
    println!(
        "hvisor-sim console-bench: zone {} console@0x{:x}, {} MiB each way",
        g.vcpu.zone(),
        spec.addr,
        n / MIB
    );
    println!(
        "  {:<24} {:>14} {:>16} {:>8}",
        "measure (MB/s)", "through stack", "pty copy", "ratio"
    );
    for (name, v, b) in rows {
        println!("  {name:<24} {v:>14.1} {b:>16.1} {:>8.3}", v / b);
    }
    let detail = |v: f64, b: f64| {
        format!(
            "mb_per_s={v:.1} baseline_mb_per_s={b:.1} ratio={:.4}",
            v / b
        )
    };
    match tx_ok {
        Ok(()) => rep.check("bench_guest_to_host", true, detail(rows[0].1, rows[0].2)),
        Err(why) => rep.check("bench_guest_to_host", false, why),
    };
    rep.check(
        "bench_host_to_guest",
        rx_ok,
        if rx_ok {
            detail(rows[1].1, rows[1].2)
        } else {
            "the bytes received differ from the host's pattern".into()
        },
    );
    rep.verified_bytes = if rx_ok { n as u64 } else { 0 };
    Ok(())
}

/// MB/s of the same bytes copied through a pty pair of our own, master to slave and slave to
/// master (a writer thread and a reader, raw mode): what a console costs with no device at all.
fn baseline(data: &[u8]) -> Result<(f64, f64)> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let pair = nix::pty::openpty(None, None)?;
    let mut t = tcgetattr(&pair.slave)?;
    cfmakeraw(&mut t);
    tcsetattr(&pair.slave, SetArg::TCSANOW, &t)?;
    let one_way = |from: &std::os::fd::OwnedFd, to: &std::os::fd::OwnedFd| -> Result<f64> {
        let start = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let writer = s.spawn(|| -> Result<()> {
                for chunk in data.chunks(64 * 1024) {
                    let mut at = 0;
                    while at < chunk.len() {
                        at += nix::unistd::write(from, &chunk[at..])?;
                    }
                }
                Ok(())
            });
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < data.len() {
                let n = nix::unistd::read(to, &mut buf)?;
                ensure!(n > 0, "end of file after {got} bytes");
                got += n;
            }
            writer.join().expect("pty writer thread")?;
            Ok(())
        })?;
        Ok(data.len() as f64 / start.elapsed().as_secs_f64() / 1e6)
    };
    let out = one_way(&pair.master, &pair.slave)?;
    let inp = one_way(&pair.slave, &pair.master)?;
    Ok((out, inp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_the_documented_splitmix64_stream() {
        // the first two outputs of splitmix64 started at 0, little-endian
        let p = pattern(0, 16);
        assert_eq!(p[..8], 0xe220_a839_7b1d_cdafu64.to_le_bytes());
        assert_eq!(p[8..], 0x6e78_9e6a_a1b9_65f4u64.to_le_bytes());
        // a prefix of a longer transfer is the shorter transfer
        assert_eq!(pattern(42, 13)[..], pattern(42, 4096)[..13]);
    }

    #[test]
    fn answers_are_read_exactly() {
        assert!(got_ok("HVC GOT 1048576 ok", MIB).is_ok());
        assert!(got_ok("HVC GOT 1048576 bad@17", MIB).is_err());
        assert!(got_ok("HVC GOT 1048575 ok", MIB).is_err());
        assert!(got_ok("", MIB).is_err());
    }
}
