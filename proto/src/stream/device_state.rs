//! Device state carried as opaque bytes: the configuration section and every
//! section that is neither RAM nor block, exactly as a VMM wrote them.
//!
//! ferry does not emulate devices, so it cannot produce their vmstate; it takes
//! it from the VMM (or from a QEMU stream through `ferry inspect
//! --extract-device-state`) and splices it into the streams it writes, which
//! is all a QEMU destination needs to load them.

use super::encode;
use super::parse::{self, Item, Parser, SectionClass, SectionHeader};
use crate::qemu_file::{QemuFileReader, QemuFileWriter, Result as FileResult};
use crate::transport::{MemTransport, Transport};

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
        out
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
            }
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
                }
            }
            _ => {}
        }
    }

    /// A section id that no device section uses and that QEMU can route PART
    /// and END headers to (never 0: every QEMU handler matches 0 by default).
    pub fn free_section_id(&self) -> u32 {
        self.sections
            .iter()
            .map(|s| s.header.id)
            .max()
            .map_or(1, |m| m + 1)
            .max(1)
    }

    /// Writes the configuration section, or one naming `machine` if there is none.
    pub fn put_configuration<T: Transport>(&self, f: &mut QemuFileWriter<'_, T>, machine: &str) {
        if self.configuration.is_empty() {
            encode::put_configuration(f, machine);
        } else {
            f.put_buffer(&self.configuration);
        }
    }

    /// Writes the device sections.
    pub fn put_sections<T: Transport>(&self, f: &mut QemuFileWriter<'_, T>) -> FileResult<()> {
        for s in &self.sections {
            f.put_buffer(&s.raw);
        }
        f.error().cloned().map_or(Ok(()), Err)
    }
}
