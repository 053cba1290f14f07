//! Device state carried as opaque bytes: the configuration section and every
//! section that is neither RAM nor block, exactly as a VMM wrote them.
//!
//! The file (`ferry receive --device-state-out`, `ferry inspect
//! --extract-device-state`, `ferry send --device-state`) holds, in stream
//! order: the configuration section; the device sections ferry could size;
//! the bytes from the first section it could not size on, carried whole;
//! and, when sections were sized, the EOF marker and the source's vmdesc
//! trailer that sized them, so the file splits again exactly as the stream
//! did. A file of only the configuration and sections (no trailer) is the
//! same format with everything after the configuration carried whole.
//!
//! ferry does not emulate devices, so it cannot produce their vmstate; it takes
//! it from the VMM (or from a QEMU stream through `ferry inspect
//! --extract-device-state`) and splices it into the streams it writes, which
//! is all a QEMU destination needs to load them.

use super::encode;
use super::parse::{self, Item, Parser, SectionClass, SectionHeader};
use crate::qemu_file::{QemuFileReader, QemuFileWriter, Result as FileResult};
use crate::transport::{MemTransport, Transport};

/// The section id ferry's own sections start from when device state it
/// carries whole may use any id a QEMU would.
pub const OPAQUE_FREE_SECTION_ID: u32 = 1 << 30;

/// One opaque section: header, body and footer bytes as on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSection {
    /// The parsed header.
    pub header: SectionHeader,
    /// The whole section, marker byte to footer.
    pub raw: Vec<u8>,
}

/// The non-RAM part of a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// The machine type of the configuration section, if there was one.
    pub machine: Option<String>,
    /// The configuration section as on the wire (empty if there was none).
    pub configuration: Vec<u8>,
    /// Device sections in stream order.
    pub sections: Vec<DeviceSection>,
    /// Device state after `sections` that no vmdesc sized: whole sections
    /// as on the wire, never split on bytes the guest controls.
    pub opaque: Vec<u8>,
    /// The source's vmdesc JSON (QEMU's description of the sections).
    pub vmdesc: Option<Vec<u8>>,
    /// The last section's header came, its footer not yet.
    open: bool,
}

impl DeviceState {
    /// Reads a device-state file.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, parse::Error> {
        let mut p = Parser::fragment(QemuFileReader::new(MemTransport::from_bytes(bytes)));
        let mut state = DeviceState::default();
        loop {
            let item = p.next()?;
            if matches!(item, Item::End) {
                return Ok(state);
            }
            state.observe(&item);
        }
    }

    /// The file `ferry inspect --extract-device-state` writes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.configuration.clone();
        for s in &self.sections {
            out.extend_from_slice(&s.raw);
        }
        out.extend_from_slice(&self.opaque);
        if let Some(json) = self.sizing_vmdesc() {
            out.push(super::marker::EOF);
            out.push(super::marker::VMDESCRIPTION);
            out.extend_from_slice(&(json.len() as u32).to_be_bytes());
            out.extend_from_slice(json);
        }
        out
    }

    /// The source's vmdesc, when it sized sections (without any it would
    /// only repeat a description of bytes carried whole).
    fn sizing_vmdesc(&self) -> Option<&[u8]> {
        self.vmdesc.as_deref().filter(|_| !self.sections.is_empty())
    }

    /// The vmdesc trailer for a stream carrying this state: the source's
    /// own, so a ferry receiver sizes the sections as the source's stream
    /// did, or ferry's minimal one (QEMU destinations only skip it).
    pub fn vmdesc_json(&self) -> &[u8] {
        self.sizing_vmdesc().unwrap_or(encode::MINIMAL_VMDESC)
    }

    /// Collects what belongs to the device state from a parsed item; call it
    /// with every item of a stream, in order.
    pub fn observe(&mut self, item: &Item<'_>) {
        match item {
            Item::Configuration { machine, raw } => {
                self.machine = Some(machine.clone());
                self.configuration = raw.to_vec();
            }
            Item::Section(h) if h.class == SectionClass::Device => {
                let mut raw = vec![h.kind.marker()];
                raw.extend_from_slice(&h.id.to_be_bytes());
                if h.kind.has_identity() {
                    raw.push(h.idstr.len() as u8);
                    raw.extend_from_slice(h.idstr.as_bytes());
                    raw.extend_from_slice(&h.instance.to_be_bytes());
                    raw.extend_from_slice(&h.version.to_be_bytes());
                }
                self.sections.push(DeviceSection {
                    header: h.clone(),
                    raw,
                });
                self.open = true;
            }
            Item::OpaqueDeviceState(bytes) => {
                // The section whose header just came is carried whole too.
                if self.open {
                    if let Some(s) = self.sections.pop() {
                        self.opaque.extend_from_slice(&s.raw);
                    }
                    self.open = false;
                }
                self.opaque.extend_from_slice(bytes);
            }
            Item::Vmdesc(json) => self.vmdesc = Some(json.to_vec()),
            Item::DeviceState(body) => {
                if let Some(s) = self.sections.last_mut() {
                    s.raw.extend_from_slice(body);
                }
            }
            Item::Footer { id, .. } => {
                // Only the section just opened can be closed here: RAM and
                // block sections never enter the list.
                if let Some(s) = self.sections.last_mut().filter(|s| s.header.id == *id) {
                    s.raw.push(super::marker::SECTION_FOOTER);
                    s.raw.extend_from_slice(&id.to_be_bytes());
                    self.open = false;
                }
            }
            _ => {}
        }
    }

    /// A section id that no device section uses and that QEMU can route PART
    /// and END headers to (never 0: every QEMU handler matches 0 by default).
    /// With bytes carried whole, whose ids ferry does not know, an id above
    /// any QEMU's: QEMU numbers its sections from 0, one per registered
    /// device (savevm.c, global_section_id).
    pub fn free_section_id(&self) -> u32 {
        let known = self
            .sections
            .iter()
            .map(|s| s.header.id)
            .max()
            .map_or(1, |m| m + 1)
            .max(1);
        if self.opaque.is_empty() {
            known
        } else {
            known.max(OPAQUE_FREE_SECTION_ID)
        }
    }

    /// Writes the configuration section, or one naming `machine` if there is none.
    pub fn put_configuration<T: Transport>(&self, f: &mut QemuFileWriter<'_, T>, machine: &str) {
        if self.configuration.is_empty() {
            encode::put_configuration(f, machine);
        } else {
            f.put_buffer(&self.configuration);
        }
    }

    /// Writes the device sections, and the bytes carried whole after them.
    pub fn put_sections<T: Transport>(&self, f: &mut QemuFileWriter<'_, T>) -> FileResult<()> {
        for s in &self.sections {
            f.put_buffer(&s.raw);
        }
        f.put_buffer(&self.opaque);
        f.error().cloned().map_or(Ok(()), Err)
    }
}
