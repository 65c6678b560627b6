//! Compiles only if an embedder can (1) keep its own `GuestMemoryMmap<AtomicBitmap>` and
//! adopt it, (2) reattach into that same type, (3) version its device state with the
//! crates' own derive and attributes, (4) implement `Persist`, all without naming the
//! payload encoding.

use cpr_memory::cpr_fd::FdRegistry;
use cpr_memory::vm_memory::bitmap::AtomicBitmap;
use cpr_memory::vm_memory::GuestMemoryMmap;
use cpr_memory::{GuestRam, MemoryLayout, MemoryOptions, ReattachArgs};
use cpr_snapshot::{Persist, Schema, Section, State};

/// A device's state at version 2: `fifo` came in version 2.
#[derive(Clone, Debug, PartialEq, Section)]
#[section(name = "my-uart")]
pub struct UartState {
    pub lcr: u8,
    #[state(since = 2, default = "empty_fifo")]
    pub fifo: Vec<u8>,
    pub timer: Timer,
}

impl UartState {
    fn empty_fifo(_version: u16) -> Vec<u8> {
        Vec::new()
    }
}

#[derive(Clone, Debug, PartialEq, State)]
pub enum Timer {
    Off,
    Periodic(u64),
}

pub struct Uart {
    lcr: u8,
    fifo: Vec<u8>,
}

impl Persist<'_> for Uart {
    type State = UartState;
    type ConstructorArgs = ();
    type Error = std::io::Error;

    fn save(&self) -> UartState {
        UartState { lcr: self.lcr, fifo: self.fifo.clone(), timer: Timer::Off }
    }

    fn restore(_: (), s: &UartState) -> Result<Self, std::io::Error> {
        Ok(Uart { lcr: s.lcr, fifo: s.fifo.clone() })
    }
}

/// The schema, state version 1 then 2.
pub fn schema() -> cpr_snapshot::Result<Schema> {
    Schema::builder()
        .section::<UartState>()
        .types_at_current(cpr_memory::section_types())
        .next_version()
        .type_version::<UartState>(2)
        .build()
}

/// The VMM's memory manager keeps its type; cpr-memory describes it.
pub fn adopt(memory: GuestMemoryMmap<AtomicBitmap>) -> cpr_memory::Result<MemoryLayout> {
    let ram: GuestRam<AtomicBitmap> = GuestRam::adopt(memory, &["guest-ram"])?;
    let mut fds = FdRegistry::new();
    ram.register_fds(&mut fds)?;
    Ok(ram.save())
}

/// And gives it back as that type after the update.
pub fn reattach(
    layout: &MemoryLayout,
    fds: &mut FdRegistry,
) -> cpr_memory::Result<GuestMemoryMmap<AtomicBitmap>> {
    let args = ReattachArgs { fds, options: MemoryOptions::default() };
    let ram: GuestRam<AtomicBitmap> = GuestRam::restore(args, layout)?;
    Ok(ram.into_memory())
}
