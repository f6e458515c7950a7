//! The project's own test guest: a 64 KiB x86 firmware image (for QEMU's `-bios`) that either
//! keeps every vCPU busy or halts every vCPU.
//!
//! The image is assembled here, instruction by instruction, so the tests and the fleet demo
//! need no downloaded or checked-in binary and no assembler. Layout (the image is mapped at
//! physical 0xF0000–0xFFFFF, reset vector at offset 0xFFF0):
//!
//! | offset | what |
//! |---|---|
//! | 0x0000 | AP entry (SIPI vector 0xF0 starts an AP at F000:0000): `cli`, then spin |
//! | 0x0100 | BSP entry: load the GDT, enter 32-bit protected mode, software-enable the local APIC, send INIT then SIPI twice to all other CPUs, then spin |
//! | 0x0200 | GDT: null, flat 32-bit code (0x9B), flat data (0x93): the "accessed" bits are preset because under KVM the CPU cannot write them back to ROM |
//! | 0x0220 | GDT descriptor |
//! | 0xFFF0 | reset vector: far jump to F000:0100 |
//!
//! The halting variant's BSP executes `cli; hlt` in a loop and never wakes the APs, which the
//! firmware-less reset leaves halted waiting for a SIPI: every vCPU thread then sleeps.

/// What the guest's vCPUs do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Every vCPU spins at 100 %.
    Busy,
    /// Every vCPU halts (0 %).
    Halt,
}

/// Size of the image: QEMU maps a 64 KiB BIOS at 0xF0000.
pub const IMAGE_SIZE: usize = 64 * 1024;
const ROM_BASE: u32 = 0xF_0000;
const BSP_ENTRY: usize = 0x100;
const GDT: usize = 0x200;
const GDT_DESC: usize = 0x220;
const RESET: usize = 0xFFF0;
const APIC_SVR: u32 = 0xFEE0_00F0;
const APIC_ICR_LOW: u32 = 0xFEE0_0300;
/// ICR: destination shorthand "all excluding self" (0b11 << 18), level assert (1 << 14).
const ICR_ALL_BUT_SELF: u32 = (0b11 << 18) | (1 << 14);
const ICR_INIT: u32 = ICR_ALL_BUT_SELF | (0b101 << 8);
/// SIPI with vector 0xF0: the APs start in real mode at 0xF0 × 4096 = 0xF0000 (offset 0).
const ICR_SIPI: u32 = ICR_ALL_BUT_SELF | (0b110 << 8) | 0xF0;

/// A tiny emitter: bytes at a cursor.
struct Asm<'a> {
    image: &'a mut [u8],
    at: usize,
}

impl Asm<'_> {
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.image[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// 32-bit code: `mov dword [addr], value`.
    fn store32(&mut self, addr: u32, value: u32) -> &mut Self {
        self.bytes(&[0xC7, 0x05]).u32(addr).u32(value)
    }
    /// 32-bit code: a short busy delay, `mov ecx, n; loop $`.
    fn delay(&mut self, n: u32) -> &mut Self {
        self.bytes(&[0xB9]).u32(n).bytes(&[0xE2, 0xFE])
    }
}

/// The firmware image.
pub fn image(behaviour: Behaviour) -> Vec<u8> {
    // Unused bytes are `hlt`, so a stray jump parks the CPU rather than running garbage.
    let mut image = vec![0xF4u8; IMAGE_SIZE];
    let mut a = Asm {
        image: &mut image,
        at: 0,
    };
    const CLI: u8 = 0xFA;
    const SPIN: [u8; 2] = [0xEB, 0xFE]; // jmp $
    const HALT_LOOP: [u8; 4] = [CLI, 0xF4, 0xEB, 0xFD]; // cli; hlt; jmp back to hlt

    // AP entry (16-bit real mode).
    match behaviour {
        Behaviour::Busy => a.bytes(&[CLI]).bytes(&SPIN),
        Behaviour::Halt => a.bytes(&HALT_LOOP),
    };

    // BSP entry (16-bit real mode, CS base 0xF0000 after the reset vector's far jump).
    a.at = BSP_ENTRY;
    match behaviour {
        Behaviour::Halt => {
            a.bytes(&HALT_LOOP);
        }
        Behaviour::Busy => {
            a.bytes(&[CLI])
                .bytes(&[0x2E, 0x0F, 0x01, 0x16]) // lgdt cs:[GDT_DESC]
                .u16(GDT_DESC as u16)
                .bytes(&[0x0F, 0x20, 0xC0]) // mov eax, cr0
                .bytes(&[0x0C, 0x01]) // or al, 1 (PE)
                .bytes(&[0x0F, 0x22, 0xC0]); // mov cr0, eax
            let far_jump = a.at;
            let protected = far_jump + 8; // 66 EA imm32 imm16
            a.bytes(&[0x66, 0xEA]) // jmp far dword 0x08:protected
                .u32(ROM_BASE + protected as u32)
                .u16(0x08);
            debug_assert_eq!(a.at, protected);
            // 32-bit protected mode, flat segments.
            a.bytes(&[0x66, 0xB8, 0x10, 0x00]) // mov ax, 0x10
                .bytes(&[0x8E, 0xD8]) // mov ds, ax
                .bytes(&[0x8E, 0xC0]) // mov es, ax
                .bytes(&[0x8E, 0xD0]) // mov ss, ax
                .store32(APIC_SVR, 0x1FF) // software-enable the local APIC
                .store32(APIC_ICR_LOW, ICR_INIT)
                .delay(0x1_0000)
                .store32(APIC_ICR_LOW, ICR_SIPI)
                .delay(0x1_0000)
                .store32(APIC_ICR_LOW, ICR_SIPI)
                .bytes(&SPIN);
        }
    }

    // GDT: null; code 0x08: base 0, limit 4 GiB, 32-bit, present, ring 0, execute/read,
    // accessed (0x9B); data 0x10: the same, read/write, accessed (0x93).
    a.at = GDT;
    a.bytes(&[0; 8])
        .bytes(&[0xFF, 0xFF, 0x00, 0x00, 0x00, 0x9B, 0xCF, 0x00])
        .bytes(&[0xFF, 0xFF, 0x00, 0x00, 0x00, 0x93, 0xCF, 0x00]);
    a.at = GDT_DESC;
    a.u16(3 * 8 - 1).u32(ROM_BASE + GDT as u32);

    // Reset vector: jmp far F000:BSP_ENTRY.
    a.at = RESET;
    a.bytes(&[0xEA]).u16(BSP_ENTRY as u16).u16(0xF000);
    image
}

/// The QEMU command line (binary first) that boots `image` as the test guest: a bare PC with
/// no devices and no display, `memory_mib` of RAM, and `accel` (`tcg,thread=multi` needs no
/// KVM; `kvm` works too). Add `-smp` as needed.
pub fn qemu_command(image: &std::path::Path, accel: &str, memory_mib: u32) -> Vec<String> {
    let mut args: Vec<String> = [
        "qemu-system-x86_64",
        "-machine",
        "pc",
        "-nodefaults",
        "-display",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "-m".into(),
        memory_mib.to_string(),
        "-accel".into(),
        accel.into(),
    ]);
    args.extend(["-bios".into(), image.display().to_string()]);
    args
}

/// Writes the image to `path`.
pub fn write(path: &std::path::Path, behaviour: Behaviour) -> std::io::Result<()> {
    std::fs::write(path, image(behaviour))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_vector_jumps_to_the_bsp_entry() {
        let img = image(Behaviour::Busy);
        assert_eq!(img.len(), IMAGE_SIZE);
        assert_eq!(&img[RESET..RESET + 5], &[0xEA, 0x00, 0x01, 0x00, 0xF0]);
    }

    #[test]
    fn gdt_descriptors_have_accessed_bits_preset() {
        let img = image(Behaviour::Busy);
        assert_eq!(img[GDT + 8 + 5], 0x9B);
        assert_eq!(img[GDT + 16 + 5], 0x93);
        assert_eq!(
            &img[GDT_DESC..GDT_DESC + 6],
            &[23, 0, 0x00, 0x02, 0x0F, 0x00]
        );
    }

    #[test]
    fn busy_aps_spin_and_halting_aps_halt() {
        assert_eq!(&image(Behaviour::Busy)[..3], &[0xFA, 0xEB, 0xFE]);
        assert_eq!(&image(Behaviour::Halt)[..4], &[0xFA, 0xF4, 0xEB, 0xFD]);
        assert_eq!(
            &image(Behaviour::Halt)[BSP_ENTRY..BSP_ENTRY + 4],
            &[0xFA, 0xF4, 0xEB, 0xFD]
        );
    }

    #[test]
    fn icr_values_are_init_and_sipi_to_all_but_self() {
        assert_eq!(ICR_INIT, 0x000C_4500);
        assert_eq!(ICR_SIPI, 0x000C_46F0);
    }
}
