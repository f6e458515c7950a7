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
//!
//! The duty-cycle variant ([`Behaviour::Duty`]) uses the same GDT and start-up, and adds:
//!
//! | offset | what |
//! |---|---|
//! | 0x0000 | AP entry: `cli`, enter 32-bit protected mode, jump to the duty loop |
//! | 0x0228 | IDT descriptor (256 gates) |
//! | 0x0240 | interrupt handler: local APIC EOI, `iret` |
//! | 0x0400 | duty loop (every CPU): a stack per APIC ID, load the IDT, enable the local APIC, mask LINT0/1, timer divide 1; then forever: spin until a masked one-shot APIC timer of the busy time reads 0, arm an unmasked one for the idle time, `sti; hlt` until it has fired |
//! | 0x1000 | IDT: every vector to the handler |
//!
//! QEMU's local APIC timer counts nanoseconds of the virtual clock at divide 1 (its bus runs at
//! 1 GHz), which without `-icount` is host time while the VM runs: the duty cycle is in real
//! time, [`DUTY_PERIOD_NS`] long. Busy time is spent polling the timer's current count with a
//! short delay between reads (one MMIO read per few microseconds, so a multi-vCPU guest does
//! not contend for QEMU's big lock); idle time is `hlt`, where the vCPU thread sleeps.

/// What the guest's vCPUs do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Every vCPU spins at 100 %.
    Busy,
    /// Every vCPU halts (0 %).
    Halt,
    /// Every vCPU is busy this percentage (1–99) of each [`DUTY_PERIOD_NS`], halted the rest.
    Duty(u8),
}

/// The duty-cycle variant's period, ns.
pub const DUTY_PERIOD_NS: u32 = 20_000_000;
const IDT_DESC: usize = 0x228;
const IRQ_HANDLER: usize = 0x240;
const DUTY_LOOP: usize = 0x400;
const IDT: usize = 0x1000;
const APIC_ID: u32 = 0xFEE0_0020;
const APIC_EOI: u32 = 0xFEE0_00B0;
const APIC_LVT_TIMER: u32 = 0xFEE0_0320;
const APIC_LVT_LINT0: u32 = 0xFEE0_0350;
const APIC_LVT_LINT1: u32 = 0xFEE0_0360;
const APIC_TIMER_INIT: u32 = 0xFEE0_0380;
const APIC_TIMER_CURRENT: u32 = 0xFEE0_0390;
const APIC_TIMER_DIVIDE: u32 = 0xFEE0_03E0;
/// LVT mask bit.
const LVT_MASKED: u32 = 1 << 16;
/// The timer's vector (any vector reaches the one handler).
const TIMER_VECTOR: u32 = 0x20;
/// Each CPU's stack top is this plus 4 KiB × its APIC ID (below 0xA0000 for up to 32 CPUs).
const STACK_BASE: u32 = 0x8_0000;

impl Behaviour {
    /// `busy`, `halt` or `duty:PCT` (1–99).
    pub fn parse(text: &str) -> Result<Behaviour, String> {
        match text {
            "busy" => Ok(Behaviour::Busy),
            "halt" => Ok(Behaviour::Halt),
            _ => text
                .strip_prefix("duty:")
                .and_then(|p| p.parse::<u8>().ok())
                .filter(|p| (1..=99).contains(p))
                .map(Behaviour::Duty)
                .ok_or_else(|| {
                    format!("{text:?}: give busy, halt or duty:PCT with PCT from 1 to 99")
                }),
        }
    }
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
    /// 16-bit code: load the GDT, set CR0.PE, far-jump to 32-bit code at image offset `to`.
    fn protected_mode(&mut self, to: usize) -> &mut Self {
        self.bytes(&[0x2E, 0x0F, 0x01, 0x16]) // lgdt cs:[GDT_DESC]
            .u16(GDT_DESC as u16)
            .bytes(&[0x0F, 0x20, 0xC0]) // mov eax, cr0
            .bytes(&[0x0C, 0x01]) // or al, 1 (PE)
            .bytes(&[0x0F, 0x22, 0xC0]) // mov cr0, eax
            .bytes(&[0x66, 0xEA]) // jmp far dword 0x08:to
            .u32(ROM_BASE + to as u32)
            .u16(0x08)
    }
    /// 32-bit code: flat data segments (selector 0x10) in DS, ES, SS.
    fn flat_segments(&mut self) -> &mut Self {
        self.bytes(&[0x66, 0xB8, 0x10, 0x00]) // mov ax, 0x10
            .bytes(&[0x8E, 0xD8]) // mov ds, ax
            .bytes(&[0x8E, 0xC0]) // mov es, ax
            .bytes(&[0x8E, 0xD0]) // mov ss, ax
    }
    /// 32-bit code: `jmp rel32` to image offset `to`.
    fn jmp(&mut self, to: usize) -> &mut Self {
        let rel = to as i64 - (self.at as i64 + 5);
        self.bytes(&[0xE9]).u32(rel as i32 as u32)
    }
    /// 32-bit code: `jnz rel8` back to image offset `to`.
    fn jnz(&mut self, to: usize) -> &mut Self {
        let rel = to as i64 - (self.at as i64 + 2);
        let rel = i8::try_from(rel).expect("a short jump");
        self.bytes(&[0x75, rel as u8])
    }
    /// 32-bit code: `mov eax, [addr]; test eax, eax`.
    fn load_test(&mut self, addr: u32) -> &mut Self {
        self.bytes(&[0xA1]).u32(addr).bytes(&[0x85, 0xC0])
    }
}

/// The duty-cycle variant's handler, IDT and loop (see the module's table).
fn duty(a: &mut Asm, pct: u8) {
    let pct = u32::from(pct.clamp(1, 99));
    let busy_ns = DUTY_PERIOD_NS / 100 * pct;
    let idle_ns = DUTY_PERIOD_NS - busy_ns;
    a.at = IDT_DESC;
    a.u16(256 * 8 - 1).u32(ROM_BASE + IDT as u32);
    a.at = IRQ_HANDLER;
    a.store32(APIC_EOI, 0).bytes(&[0xCF]); // iret
    a.at = IDT;
    let handler = ROM_BASE + IRQ_HANDLER as u32;
    for _ in 0..256 {
        // 32-bit interrupt gate: offset 15..0, selector 0x08, 0, P|DPL0|0xE, offset 31..16.
        a.u16(handler as u16)
            .u16(0x08)
            .bytes(&[0x00, 0x8E])
            .u16((handler >> 16) as u16);
    }
    a.at = DUTY_LOOP;
    a.flat_segments()
        .bytes(&[0xA1]) // mov eax, [APIC_ID]
        .u32(APIC_ID)
        .bytes(&[0xC1, 0xE8, 24]) // shr eax, 24
        .bytes(&[0xC1, 0xE0, 12]) // shl eax, 12
        .bytes(&[0x05]) // add eax, STACK_BASE
        .u32(STACK_BASE)
        .bytes(&[0x89, 0xC4]) // mov esp, eax
        .bytes(&[0x0F, 0x01, 0x1D]) // lidt [IDT_DESC]
        .u32(ROM_BASE + IDT_DESC as u32)
        .store32(APIC_SVR, 0x1FF)
        .store32(APIC_LVT_LINT0, LVT_MASKED)
        .store32(APIC_LVT_LINT1, LVT_MASKED)
        .store32(APIC_TIMER_DIVIDE, 0xB); // divide by 1
    let again = a.at;
    a.store32(APIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR)
        .store32(APIC_TIMER_INIT, busy_ns);
    let spin = a.at;
    a.delay(200).load_test(APIC_TIMER_CURRENT).jnz(spin);
    a.store32(APIC_LVT_TIMER, TIMER_VECTOR)
        .store32(APIC_TIMER_INIT, idle_ns);
    let idle = a.at;
    a.bytes(&[0xFB, 0xF4, 0xFA]) // sti; hlt; cli
        .load_test(APIC_TIMER_CURRENT)
        .jnz(idle)
        .jmp(again);
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
        Behaviour::Duty(_) => {
            a.bytes(&[CLI]);
            a.protected_mode(DUTY_LOOP)
        }
    };

    // BSP entry (16-bit real mode, CS base 0xF0000 after the reset vector's far jump).
    a.at = BSP_ENTRY;
    match behaviour {
        Behaviour::Halt => {
            a.bytes(&HALT_LOOP);
        }
        Behaviour::Busy | Behaviour::Duty(_) => {
            a.bytes(&[CLI]);
            let protected = a.at + 22; // past the 22 bytes of protected_mode
            a.protected_mode(protected);
            debug_assert_eq!(a.at, protected);
            // 32-bit protected mode, flat segments.
            a.flat_segments()
                .store32(APIC_SVR, 0x1FF) // software-enable the local APIC
                .store32(APIC_ICR_LOW, ICR_INIT)
                .delay(0x1_0000)
                .store32(APIC_ICR_LOW, ICR_SIPI)
                .delay(0x1_0000)
                .store32(APIC_ICR_LOW, ICR_SIPI);
            match behaviour {
                Behaviour::Duty(_) => a.jmp(DUTY_LOOP),
                _ => a.bytes(&SPIN),
            };
        }
    }
    if let Behaviour::Duty(pct) = behaviour {
        duty(&mut a, pct);
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

    /// FNV-1a, to pin the images down.
    fn fnv(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    #[test]
    fn busy_and_halt_images_are_unchanged_by_the_duty_variant() {
        // The images as they were before Behaviour::Duty existed.
        assert_eq!(fnv(&image(Behaviour::Busy)), 0x9b54_c15e_cfac_fa20);
        assert_eq!(fnv(&image(Behaviour::Halt)), 0xab75_31e5_a8ea_d2f8);
    }

    #[test]
    fn duty_images_differ_only_in_their_timings() {
        let (a, b) = (image(Behaviour::Duty(30)), image(Behaviour::Duty(70)));
        let differ: Vec<usize> = (0..IMAGE_SIZE).filter(|&i| a[i] != b[i]).collect();
        assert!(!differ.is_empty() && differ.iter().all(|&i| i > DUTY_LOOP && i < IDT));
        // The AP enters protected mode and jumps to the loop; the BSP ends with a jump there.
        assert_eq!(a[0], 0xFA);
        assert_eq!(&a[1..5], &[0x2E, 0x0F, 0x01, 0x16]);
        assert_eq!(
            u32::from_le_bytes(a[17..21].try_into().unwrap()),
            ROM_BASE + DUTY_LOOP as u32
        );
        // Every IDT gate points at the handler, which EOIs and returns.
        assert_eq!(
            &a[IDT..IDT + 8],
            &[0x40, 0x02, 0x08, 0x00, 0x00, 0x8E, 0x0F, 0x00]
        );
        assert_eq!(&a[IDT + 255 * 8..IDT + 256 * 8], &a[IDT..IDT + 8]);
        assert_eq!(a[IRQ_HANDLER + 10], 0xCF);
    }

    #[test]
    fn behaviours_parse() {
        assert_eq!(Behaviour::parse("busy"), Ok(Behaviour::Busy));
        assert_eq!(Behaviour::parse("halt"), Ok(Behaviour::Halt));
        assert_eq!(Behaviour::parse("duty:30"), Ok(Behaviour::Duty(30)));
        for bad in ["duty:0", "duty:100", "duty:", "duty:x", "spin", ""] {
            assert!(Behaviour::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn icr_values_are_init_and_sipi_to_all_but_self() {
        assert_eq!(ICR_INIT, 0x000C_4500);
        assert_eq!(ICR_SIPI, 0x000C_46F0);
    }
}
