//! The two guest drivers behind one interface: the stock `VirtIONetRaw` of virtio-drivers
//! (VERSION_1, MAC, STATUS, EVENT_IDX, INDIRECT_DESC; one receive buffer per frame), and
//! [`OwnNic`], a minimal driver of our own on `virtio_drivers::queue::VirtQueue` that
//! negotiates MRG_RXBUF and MTU, reads the whole config space and, leaving EVENT_IDX out,
//! exercises the ring flags for notification suppression instead.

use std::sync::atomic::{fence, Ordering};

use anyhow::{bail, ensure, Context, Result};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::{Error, Hal};

use super::wire::Mac;
use crate::guest::IrqWaiter;
use crate::transport::SimTransport;

/// Queue size of both drivers: the device's QueueNumMax.
pub const QSIZE: usize = 256;
const RXQ: u16 = 0;
const TXQ: u16 = 1;

/// Feature bits (virtio 1.2, 5.1.3 and 6).
pub mod feat {
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// What the stock driver accepts when offered (virtio-drivers 0.13, `SUPPORTED_FEATURES`).
pub const STOCK_FEATURES: u64 =
    feat::MAC | feat::STATUS | feat::EVENT_IDX | feat::INDIRECT_DESC | feat::VERSION_1;
/// What [`OwnNic`] asks for.
pub const OWN_FEATURES: u64 =
    feat::VERSION_1 | feat::MAC | feat::STATUS | feat::MTU | feat::MRG_RXBUF;

/// `struct virtio_net_config` up to `mtu`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: Mac,
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

/// What a driver saw.
#[derive(Debug, Default, Clone)]
pub struct NicStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    pub rx_buffers: u64,
    /// The most buffers one received frame took (num_buffers).
    pub max_buffers: u16,
    /// Frames that took more than one buffer.
    pub merged_frames: u64,
    /// Received headers whose fields were not what the device must write, first few.
    pub bad_headers: Vec<String>,
    pub bad_header_count: u64,
}

impl NicStats {
    fn bad_header(&mut self, what: String) {
        self.bad_header_count += 1;
        if self.bad_headers.len() < 4 {
            self.bad_headers.push(what);
        }
    }

    /// Checks a received header (`num_buffers` only in a 12-byte header).
    fn check_header(&mut self, hdr: &[u8], max_buffers: u16) -> u16 {
        let flags = hdr[0];
        let gso = hdr[1];
        let n = if hdr.len() >= 12 {
            u16::from_le_bytes([hdr[10], hdr[11]])
        } else {
            1
        };
        if flags != 0 || gso != 0 {
            self.bad_header(format!(
                "flags {flags:#x}, gso_type {gso:#x}: no offload was negotiated"
            ));
        }
        if n == 0 || n > max_buffers {
            self.bad_header(format!("num_buffers {n}, expected 1..={max_buffers}"));
        }
        n.max(1)
    }
}

/// A network device as the guest stack sees it: frames without the virtio-net header.
pub trait Nic {
    fn mac(&self) -> Mac;
    /// Queues a frame for transmission; with the ring full, first waits for the device to
    /// complete some.
    fn send(&mut self, irq: &mut IrqWaiter, frame: &[u8]) -> Result<()>;
    /// The next received frame, if one is complete; never waits.
    fn recv(&mut self) -> Result<Option<Vec<u8>>>;
    /// Takes back completed transmissions; returns how many.
    fn reap_tx(&mut self) -> Result<usize>;
    /// Reads InterruptStatus and acknowledges it, as the interrupt handler does.
    fn ack(&mut self);
    /// Whether used receive buffers are offered again (and, turned on, tops the ring up).
    fn set_refill(&mut self, on: bool) -> Result<()>;
    fn rx_posted(&self) -> usize;
    fn stats(&self) -> &NicStats;
}

/// Waits for room in a transmit ring: completions first, then the interrupt.
fn wait_tx_room<N: Nic + ?Sized>(nic: &mut N, irq: &mut IrqWaiter) -> Result<()> {
    if nic.reap_tx()? > 0 {
        return Ok(());
    }
    if irq.wait() {
        nic.ack();
        nic.reap_tx()?;
        irq.eoi();
        return Ok(());
    }
    if nic.reap_tx()? > 0 {
        return Ok(());
    }
    bail!(
        "the transmit ring stayed full for {:?}{}",
        irq.timeout(),
        if irq.broker_gone() {
            " (the broker went away)"
        } else {
            ""
        }
    )
}

/// The stock driver, one frame per receive buffer.
pub struct StockNic<'a, H: Hal> {
    dev: VirtIONetRaw<H, SimTransport<'a>, QSIZE>,
    hdr_len: usize,
    buf_len: usize,
    rx: Vec<Option<Box<[u8]>>>,
    tx: Vec<Option<Vec<u8>>>,
    rx_posted: usize,
    refill: bool,
    pub features: u64,
    stats: NicStats,
}

impl<'a, H: Hal> StockNic<'a, H> {
    /// Initialises the device and offers a full ring of `buf_len`-byte receive buffers.
    pub fn open(mut t: SimTransport<'a>, buf_len: usize) -> Result<Self> {
        let features = t.read_device_features() & STOCK_FEATURES;
        let dev = VirtIONetRaw::<H, _, QSIZE>::new(t)?;
        let mut scratch = [0u8; 16];
        let hdr_len = dev.fill_buffer_header(&mut scratch)?;
        let mut nic = StockNic {
            dev,
            hdr_len,
            buf_len,
            rx: (0..QSIZE).map(|_| None).collect(),
            tx: (0..QSIZE).map(|_| None).collect(),
            rx_posted: 0,
            refill: true,
            features,
            stats: NicStats::default(),
        };
        nic.top_up()?;
        Ok(nic)
    }

    pub fn header_len(&self) -> usize {
        self.hdr_len
    }

    fn top_up(&mut self) -> Result<()> {
        while self.refill && self.rx_posted < QSIZE {
            let mut buf = vec![0u8; self.buf_len].into_boxed_slice();
            // SAFETY: the buffer moves into `self.rx` (its heap storage stays put) and is
            // touched again only by `receive_complete` with this token.
            let token = unsafe { self.dev.receive_begin(&mut buf) }?;
            let slot = self
                .rx
                .get_mut(usize::from(token))
                .context("receive token out of range")?;
            ensure!(slot.is_none(), "receive token {token} handed out twice");
            *slot = Some(buf);
            self.rx_posted += 1;
        }
        Ok(())
    }
}

impl<H: Hal> Nic for StockNic<'_, H> {
    fn mac(&self) -> Mac {
        self.dev.mac_address()
    }

    fn send(&mut self, irq: &mut IrqWaiter, frame: &[u8]) -> Result<()> {
        let mut buf = vec![0u8; self.hdr_len + frame.len()];
        self.dev.fill_buffer_header(&mut buf)?;
        buf[self.hdr_len..].copy_from_slice(frame);
        loop {
            // SAFETY: the buffer moves into `self.tx` (its heap storage stays put) and is
            // touched again only by `transmit_complete` with this token.
            match unsafe { self.dev.transmit_begin(&buf) } {
                Ok(token) => {
                    let slot = self
                        .tx
                        .get_mut(usize::from(token))
                        .context("transmit token out of range")?;
                    *slot = Some(buf);
                    self.stats.tx_frames += 1;
                    return Ok(());
                }
                Err(Error::QueueFull) => wait_tx_room(self, irq)?,
                Err(e) => bail!("transmitting: {e}"),
            }
        }
    }

    fn recv(&mut self) -> Result<Option<Vec<u8>>> {
        fence(Ordering::SeqCst);
        let Some(token) = self.dev.poll_receive() else {
            return Ok(None);
        };
        let mut buf = self
            .rx
            .get_mut(usize::from(token))
            .and_then(Option::take)
            .with_context(|| format!("the device used receive token {token}, never offered"))?;
        // SAFETY: the buffer offered with this token.
        let (hdr, len) = unsafe { self.dev.receive_complete(token, &mut buf) }?;
        self.rx_posted -= 1;
        ensure!(
            hdr + len <= buf.len(),
            "the device used {} bytes of a {}-byte buffer",
            hdr + len,
            buf.len()
        );
        self.stats.check_header(&buf[..hdr], 1);
        let frame = buf[hdr..hdr + len].to_vec();
        self.stats.rx_frames += 1;
        self.stats.rx_buffers += 1;
        self.stats.max_buffers = self.stats.max_buffers.max(1);
        self.top_up()?;
        Ok(Some(frame))
    }

    fn reap_tx(&mut self) -> Result<usize> {
        let mut n = 0;
        loop {
            fence(Ordering::SeqCst);
            let Some(token) = self.dev.poll_transmit() else {
                return Ok(n);
            };
            let buf = self
                .tx
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .with_context(|| {
                    format!("the device used transmit token {token}, never offered")
                })?;
            // SAFETY: the buffer offered with this token.
            unsafe { self.dev.transmit_complete(token, &buf) }?;
            n += 1;
        }
    }

    fn ack(&mut self) {
        self.dev.ack_interrupt();
    }

    fn set_refill(&mut self, on: bool) -> Result<()> {
        self.refill = on;
        self.top_up()
    }

    fn rx_posted(&self) -> usize {
        self.rx_posted
    }

    fn stats(&self) -> &NicStats {
        &self.stats
    }
}

/// Our own driver: MRG_RXBUF (a frame may span receive buffers), MTU, the config space, and
/// transmit chains of two descriptors (header, frame).
pub struct OwnNic<'a, H: Hal> {
    t: SimTransport<'a>,
    rxq: VirtQueue<H, QSIZE>,
    txq: VirtQueue<H, QSIZE>,
    pub device_features: u64,
    pub negotiated: u64,
    pub config: NetConfig,
    hdr_len: usize,
    mergeable: bool,
    buf_len: usize,
    rx: Vec<Option<Box<[u8]>>>,
    tx: Vec<Option<[Vec<u8>; 2]>>,
    rx_posted: usize,
    refill: bool,
    /// A frame received in part: its bytes so far and the buffers still to come.
    partial: Option<(Vec<u8>, u16)>,
    stats: NicStats,
}

impl<'a, H: Hal> OwnNic<'a, H> {
    /// Resets the device (Status 0), initialises it from scratch (virtio 3.1.1) and offers a
    /// full ring of `buf_len`-byte receive buffers.
    pub fn init(mut t: SimTransport<'a>, wanted: u64, buf_len: usize) -> Result<Self> {
        let (device_features, negotiated) = t.negotiate(wanted)?;
        let config = t
            .read_consistent(|| {
                let mut mac = [0u8; 6];
                for (i, b) in mac.iter_mut().enumerate() {
                    *b = t.read_config_space::<u8>(i)?;
                }
                Ok(NetConfig {
                    mac,
                    status: t.read_config_space::<u16>(6)?,
                    max_virtqueue_pairs: t.read_config_space::<u16>(8)?,
                    mtu: t.read_config_space::<u16>(10)?,
                })
            })
            .context("reading the config space")?;
        let event_idx = negotiated & feat::EVENT_IDX != 0;
        let rxq = VirtQueue::new(&mut t, RXQ, false, event_idx).context("receiveq1")?;
        let txq = VirtQueue::new(&mut t, TXQ, false, event_idx).context("transmitq1")?;
        t.driver_ok();
        let mergeable = negotiated & feat::MRG_RXBUF != 0;
        let mut nic = OwnNic {
            t,
            rxq,
            txq,
            device_features,
            negotiated,
            config,
            hdr_len: if negotiated & (feat::VERSION_1 | feat::MRG_RXBUF) != 0 {
                12
            } else {
                10
            },
            mergeable,
            buf_len,
            rx: (0..QSIZE).map(|_| None).collect(),
            tx: (0..QSIZE).map(|_| None).collect(),
            rx_posted: 0,
            refill: true,
            partial: None,
            stats: NicStats::default(),
        };
        nic.top_up()?;
        Ok(nic)
    }

    fn top_up(&mut self) -> Result<()> {
        let mut notify = false;
        while self.refill && self.rx_posted < QSIZE {
            let mut buf = vec![0u8; self.buf_len].into_boxed_slice();
            // SAFETY: the buffer moves into `self.rx` (its heap storage stays put) and is
            // touched again only by `pop_used` with this token.
            let token = unsafe { self.rxq.add(&[], &mut [&mut buf]) }?;
            let slot = self
                .rx
                .get_mut(usize::from(token))
                .context("receive token out of range")?;
            *slot = Some(buf);
            self.rx_posted += 1;
            notify |= self.rxq.should_notify();
        }
        if notify {
            self.t.notify(RXQ);
        }
        Ok(())
    }
}

impl<H: Hal> Nic for OwnNic<'_, H> {
    fn mac(&self) -> Mac {
        self.config.mac
    }

    fn send(&mut self, irq: &mut IrqWaiter, frame: &[u8]) -> Result<()> {
        let parts = [vec![0u8; self.hdr_len], frame.to_vec()];
        loop {
            // SAFETY: the parts move into `self.tx` (their heap storage stays put) and are
            // touched again only by `pop_used` with this token.
            match unsafe { self.txq.add(&[&parts[0], &parts[1]], &mut []) } {
                Ok(token) => {
                    let slot = self
                        .tx
                        .get_mut(usize::from(token))
                        .context("transmit token out of range")?;
                    *slot = Some(parts);
                    if self.txq.should_notify() {
                        self.t.notify(TXQ);
                    }
                    self.stats.tx_frames += 1;
                    return Ok(());
                }
                Err(Error::QueueFull) => wait_tx_room(self, irq)?,
                Err(e) => bail!("transmitting: {e}"),
            }
        }
    }

    fn recv(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            fence(Ordering::SeqCst);
            let Some(token) = self.rxq.peek_used() else {
                return Ok(None);
            };
            let mut buf = self
                .rx
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .with_context(|| format!("the device used receive token {token}, never offered"))?;
            // SAFETY: the buffer offered with this token.
            let len = unsafe { self.rxq.pop_used(token, &[], &mut [&mut buf]) }? as usize;
            self.rx_posted -= 1;
            self.stats.rx_buffers += 1;
            ensure!(
                len <= buf.len(),
                "the device used {len} bytes of a {}-byte buffer",
                buf.len()
            );
            let done = match self.partial.take() {
                None => {
                    ensure!(
                        len >= self.hdr_len,
                        "a {len}-byte receive buffer, shorter than the header"
                    );
                    let max = if self.mergeable { QSIZE as u16 } else { 1 };
                    let n = self.stats.check_header(&buf[..self.hdr_len], max);
                    let data = buf[self.hdr_len..len].to_vec();
                    self.stats.max_buffers = self.stats.max_buffers.max(n);
                    if n > 1 {
                        self.stats.merged_frames += 1;
                        self.partial = Some((data, n - 1));
                        None
                    } else {
                        Some(data)
                    }
                }
                Some((mut data, left)) => {
                    data.extend_from_slice(&buf[..len]);
                    if left > 1 {
                        self.partial = Some((data, left - 1));
                        None
                    } else {
                        Some(data)
                    }
                }
            };
            self.top_up()?;
            if let Some(frame) = done {
                self.stats.rx_frames += 1;
                return Ok(Some(frame));
            }
        }
    }

    fn reap_tx(&mut self) -> Result<usize> {
        let mut n = 0;
        loop {
            fence(Ordering::SeqCst);
            let Some(token) = self.txq.peek_used() else {
                return Ok(n);
            };
            let parts = self
                .tx
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .with_context(|| {
                    format!("the device used transmit token {token}, never offered")
                })?;
            // SAFETY: the parts offered with this token.
            unsafe { self.txq.pop_used(token, &[&parts[0], &parts[1]], &mut []) }?;
            n += 1;
        }
    }

    fn ack(&mut self) {
        self.t.read_isr_and_ack();
    }

    fn set_refill(&mut self, on: bool) -> Result<()> {
        self.refill = on;
        self.top_up()
    }

    fn rx_posted(&self) -> usize {
        self.rx_posted
    }

    fn stats(&self) -> &NicStats {
        &self.stats
    }
}

impl<H: Hal> Drop for OwnNic<'_, H> {
    fn drop(&mut self) {
        // Reset before the rings are freed, so the device stops looking at them.
        self.t.set_status(DeviceStatus::empty());
    }
}
