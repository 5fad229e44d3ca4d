//! virtio-net guests.

use anyhow::{bail, Result};
use virtio_drivers::Hal;

use super::GuestDev;
use crate::report::DeviceReport;

pub fn verify<H: Hal>(_g: &mut GuestDev, _rep: &mut DeviceReport) -> Result<()> {
    bail!("the net-verify guest is not written yet")
}

pub fn bench<H: Hal>(_g: &mut GuestDev, _rep: &mut DeviceReport) -> Result<()> {
    bail!("the net-bench guest is not written yet")
}
