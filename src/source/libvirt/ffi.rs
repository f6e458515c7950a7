//! Declarations of the part of libvirt's C API burst-qemu calls: types, constants and
//! functions, and the opening of the library they are in (`libvirt.so.0`, at the first
//! connection: [`load`]). No other logic; the safe layer is `conn.rs`.
//!
//! libvirt keeps its public ABI stable forever (symbols are versioned and never removed or
//! changed), so these hand-written declarations stay valid on every libvirt newer than the
//! oldest function used (`virGetLastErrorCode`, 4.5.0; Debian 12 ships 9.0.0). Every struct
//! layout and constant below was printed by a C program compiled against libvirt 9.0's headers;
//! the layouts are checked by the compiler here, and `tests/libvirt.rs` compiles that program
//! again and compares every constant.

#![allow(non_camel_case_types, missing_docs)]

use std::ffi::{c_char, c_int, c_uchar, c_uint, c_ulong, c_ulonglong, c_ushort, c_void, CString};
use std::mem::{offset_of, size_of};
use std::sync::OnceLock;

/// `virConnect` (opaque).
#[repr(C)]
pub struct virConnect {
    _private: [u8; 0],
}
/// `virDomain` (opaque).
#[repr(C)]
pub struct virDomain {
    _private: [u8; 0],
}
/// `virError` (only handed to the error callback, never read).
#[repr(C)]
pub struct virError {
    _private: [u8; 0],
}

pub type virConnectPtr = *mut virConnect;
pub type virDomainPtr = *mut virDomain;
pub type virErrorFunc = Option<unsafe extern "C" fn(user_data: *mut c_void, error: *mut virError)>;

/// `VIR_TYPED_PARAM_FIELD_LENGTH`.
pub const VIR_TYPED_PARAM_FIELD_LENGTH: usize = 80;
/// `VIR_UUID_STRING_BUFLEN`.
pub const VIR_UUID_STRING_BUFLEN: usize = 37;

/// `virTypedParameter`'s value union.
#[repr(C)]
#[derive(Clone, Copy)]
pub union virTypedParameterValue {
    pub i: c_int,
    pub ui: c_uint,
    pub l: i64,
    pub ul: u64,
    pub d: f64,
    pub b: c_char,
    pub s: *mut c_char,
}

/// `virTypedParameter`.
#[repr(C)]
pub struct virTypedParameter {
    pub field: [c_char; VIR_TYPED_PARAM_FIELD_LENGTH],
    pub type_: c_int,
    pub value: virTypedParameterValue,
}

/// `virDomainStatsRecord`.
#[repr(C)]
pub struct virDomainStatsRecord {
    pub dom: virDomainPtr,
    pub params: *mut virTypedParameter,
    pub nparams: c_int,
}

/// `virDomainMemoryStatStruct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct virDomainMemoryStatStruct {
    pub tag: c_int,
    pub val: c_ulonglong,
}

/// `virDomainInfo`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct virDomainInfo {
    pub state: c_uchar,
    pub max_mem: c_ulong,
    pub memory: c_ulong,
    pub nr_virt_cpu: c_ushort,
    pub cpu_time: c_ulonglong,
}

// Layouts as libvirt 9.0's headers give them on x86_64 (sizeof/offsetof printed by C).
const _: () = assert!(size_of::<virTypedParameter>() == 96);
const _: () = assert!(offset_of!(virTypedParameter, type_) == 80);
const _: () = assert!(offset_of!(virTypedParameter, value) == 88);
const _: () = assert!(size_of::<virDomainStatsRecord>() == 24);
const _: () = assert!(size_of::<virDomainMemoryStatStruct>() == 16);
const _: () = assert!(size_of::<virDomainInfo>() == 40);
const _: () = assert!(offset_of!(virDomainInfo, nr_virt_cpu) == 24);
const _: () = assert!(offset_of!(virDomainInfo, cpu_time) == 32);

pub const VIR_DOMAIN_AFFECT_CURRENT: c_uint = 0;
pub const VIR_DOMAIN_AFFECT_LIVE: c_uint = 1;
pub const VIR_DOMAIN_AFFECT_CONFIG: c_uint = 2;
pub const VIR_DOMAIN_METADATA_ELEMENT: c_int = 2;
pub const VIR_DOMAIN_VCPU_MAXIMUM: c_uint = 4;
pub const VIR_DOMAIN_STATS_STATE: c_uint = 1;
pub const VIR_DOMAIN_STATS_BALLOON: c_uint = 4;
pub const VIR_DOMAIN_STATS_VCPU: c_uint = 8;
pub const VIR_TYPED_PARAM_INT: c_int = 1;
pub const VIR_TYPED_PARAM_UINT: c_int = 2;
pub const VIR_TYPED_PARAM_LLONG: c_int = 3;
pub const VIR_TYPED_PARAM_ULLONG: c_int = 4;
pub const VIR_TYPED_PARAM_DOUBLE: c_int = 5;
pub const VIR_TYPED_PARAM_BOOLEAN: c_int = 6;
pub const VIR_TYPED_PARAM_STRING: c_int = 7;
pub const VIR_DOMAIN_MEMORY_STAT_UNUSED: c_int = 4;
pub const VIR_DOMAIN_MEMORY_STAT_AVAILABLE: c_int = 5;
pub const VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON: c_int = 6;
pub const VIR_DOMAIN_MEMORY_STAT_RSS: c_int = 7;
pub const VIR_DOMAIN_MEMORY_STAT_USABLE: c_int = 8;
pub const VIR_DOMAIN_MEMORY_STAT_LAST_UPDATE: c_int = 9;
pub const VIR_DOMAIN_MEMORY_STAT_NR: c_int = 13;
pub const VIR_ERR_NO_CONNECT: c_int = 5;
pub const VIR_ERR_SYSTEM_ERROR: c_int = 38;
pub const VIR_ERR_NO_DOMAIN: c_int = 42;
pub const VIR_ERR_OPERATION_INVALID: c_int = 55;
pub const VIR_ERR_NO_DOMAIN_METADATA: c_int = 80;
pub const VIR_DOMAIN_UNDEFINE_MANAGED_SAVE: c_uint = 1;
pub const VIR_DOMAIN_XML_INACTIVE: c_uint = 2;

/// Every constant above with its C name, for the check against libvirt's headers.
pub const CONSTANTS: &[(&str, i64)] = &[
    (
        "VIR_TYPED_PARAM_FIELD_LENGTH",
        VIR_TYPED_PARAM_FIELD_LENGTH as i64,
    ),
    ("VIR_UUID_STRING_BUFLEN", VIR_UUID_STRING_BUFLEN as i64),
    (
        "VIR_DOMAIN_AFFECT_CURRENT",
        VIR_DOMAIN_AFFECT_CURRENT as i64,
    ),
    ("VIR_DOMAIN_AFFECT_LIVE", VIR_DOMAIN_AFFECT_LIVE as i64),
    ("VIR_DOMAIN_AFFECT_CONFIG", VIR_DOMAIN_AFFECT_CONFIG as i64),
    (
        "VIR_DOMAIN_METADATA_ELEMENT",
        VIR_DOMAIN_METADATA_ELEMENT as i64,
    ),
    ("VIR_DOMAIN_VCPU_MAXIMUM", VIR_DOMAIN_VCPU_MAXIMUM as i64),
    ("VIR_DOMAIN_STATS_STATE", VIR_DOMAIN_STATS_STATE as i64),
    ("VIR_DOMAIN_STATS_BALLOON", VIR_DOMAIN_STATS_BALLOON as i64),
    ("VIR_DOMAIN_STATS_VCPU", VIR_DOMAIN_STATS_VCPU as i64),
    ("VIR_TYPED_PARAM_INT", VIR_TYPED_PARAM_INT as i64),
    ("VIR_TYPED_PARAM_UINT", VIR_TYPED_PARAM_UINT as i64),
    ("VIR_TYPED_PARAM_LLONG", VIR_TYPED_PARAM_LLONG as i64),
    ("VIR_TYPED_PARAM_ULLONG", VIR_TYPED_PARAM_ULLONG as i64),
    ("VIR_TYPED_PARAM_DOUBLE", VIR_TYPED_PARAM_DOUBLE as i64),
    ("VIR_TYPED_PARAM_BOOLEAN", VIR_TYPED_PARAM_BOOLEAN as i64),
    ("VIR_TYPED_PARAM_STRING", VIR_TYPED_PARAM_STRING as i64),
    (
        "VIR_DOMAIN_MEMORY_STAT_UNUSED",
        VIR_DOMAIN_MEMORY_STAT_UNUSED as i64,
    ),
    (
        "VIR_DOMAIN_MEMORY_STAT_AVAILABLE",
        VIR_DOMAIN_MEMORY_STAT_AVAILABLE as i64,
    ),
    (
        "VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON",
        VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON as i64,
    ),
    (
        "VIR_DOMAIN_MEMORY_STAT_RSS",
        VIR_DOMAIN_MEMORY_STAT_RSS as i64,
    ),
    (
        "VIR_DOMAIN_MEMORY_STAT_USABLE",
        VIR_DOMAIN_MEMORY_STAT_USABLE as i64,
    ),
    (
        "VIR_DOMAIN_MEMORY_STAT_LAST_UPDATE",
        VIR_DOMAIN_MEMORY_STAT_LAST_UPDATE as i64,
    ),
    (
        "VIR_DOMAIN_MEMORY_STAT_NR",
        VIR_DOMAIN_MEMORY_STAT_NR as i64,
    ),
    ("VIR_ERR_NO_CONNECT", VIR_ERR_NO_CONNECT as i64),
    ("VIR_ERR_SYSTEM_ERROR", VIR_ERR_SYSTEM_ERROR as i64),
    ("VIR_ERR_NO_DOMAIN", VIR_ERR_NO_DOMAIN as i64),
    (
        "VIR_ERR_OPERATION_INVALID",
        VIR_ERR_OPERATION_INVALID as i64,
    ),
    (
        "VIR_ERR_NO_DOMAIN_METADATA",
        VIR_ERR_NO_DOMAIN_METADATA as i64,
    ),
    (
        "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",
        VIR_DOMAIN_UNDEFINE_MANAGED_SAVE as i64,
    ),
    ("VIR_DOMAIN_XML_INACTIVE", VIR_DOMAIN_XML_INACTIVE as i64),
    // lifecycle.rs's states and reasons.
    ("VIR_DOMAIN_NOSTATE", 0),
    ("VIR_DOMAIN_RUNNING", 1),
    ("VIR_DOMAIN_BLOCKED", 2),
    ("VIR_DOMAIN_PAUSED", 3),
    ("VIR_DOMAIN_SHUTDOWN", 4),
    ("VIR_DOMAIN_SHUTOFF", 5),
    ("VIR_DOMAIN_CRASHED", 6),
    ("VIR_DOMAIN_PMSUSPENDED", 7),
    (
        "VIR_DOMAIN_RUNNING_BOOTED",
        super::lifecycle::running::BOOTED as i64,
    ),
    (
        "VIR_DOMAIN_RUNNING_MIGRATED",
        super::lifecycle::running::MIGRATED as i64,
    ),
    (
        "VIR_DOMAIN_RUNNING_RESTORED",
        super::lifecycle::running::RESTORED as i64,
    ),
    (
        "VIR_DOMAIN_RUNNING_FROM_SNAPSHOT",
        super::lifecycle::running::FROM_SNAPSHOT as i64,
    ),
    (
        "VIR_DOMAIN_SHUTOFF_SHUTDOWN",
        super::lifecycle::shutoff::SHUTDOWN as i64,
    ),
    (
        "VIR_DOMAIN_SHUTOFF_DESTROYED",
        super::lifecycle::shutoff::DESTROYED as i64,
    ),
    (
        "VIR_DOMAIN_SHUTOFF_CRASHED",
        super::lifecycle::shutoff::CRASHED as i64,
    ),
    (
        "VIR_DOMAIN_SHUTOFF_MIGRATED",
        super::lifecycle::shutoff::MIGRATED as i64,
    ),
    (
        "VIR_DOMAIN_SHUTOFF_SAVED",
        super::lifecycle::shutoff::SAVED as i64,
    ),
    (
        "VIR_DOMAIN_SHUTOFF_FAILED",
        super::lifecycle::shutoff::FAILED as i64,
    ),
    (
        "VIR_DOMAIN_SHUTOFF_DAEMON",
        super::lifecycle::shutoff::DAEMON as i64,
    ),
];

/// Every layout above: `(C expression, Rust value)`.
pub const LAYOUTS: &[(&str, usize)] = &[
    ("sizeof(virTypedParameter)", size_of::<virTypedParameter>()),
    (
        "offsetof(virTypedParameter, type)",
        offset_of!(virTypedParameter, type_),
    ),
    (
        "offsetof(virTypedParameter, value)",
        offset_of!(virTypedParameter, value),
    ),
    (
        "sizeof(virDomainStatsRecord)",
        size_of::<virDomainStatsRecord>(),
    ),
    (
        "sizeof(virDomainMemoryStatStruct)",
        size_of::<virDomainMemoryStatStruct>(),
    ),
    ("sizeof(virDomainInfo)", size_of::<virDomainInfo>()),
    (
        "offsetof(virDomainInfo, nrVirtCpu)",
        offset_of!(virDomainInfo, nr_virt_cpu),
    ),
    (
        "offsetof(virDomainInfo, cpuTime)",
        offset_of!(virDomainInfo, cpu_time),
    ),
];

/// How libvirt is reached: `libvirt.so.0` is opened when the first connection is
/// ([`load`], from `Connection::open`), not linked. Linked, every start of the binary paid for
/// libvirt's 50-odd libraries whether it talked to libvirtd or not: in the emulated scx-6.12
/// guest of the test suite `burst-qemu --version` took 355–422 ms linked and 190–197 ms
/// without (10 runs each; `/bin/true` 37–44 ms), and every launcher, CLI call and agent start
/// there paid it. A host without libvirt now runs every other command, and a libvirt command
/// there says the library is missing.
const LIBRARY: &str = "libvirt.so.0";

macro_rules! libvirt_functions {
    ($( fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?; )*) => {
        /// The functions, resolved in the opened library.
        #[allow(non_snake_case)]
        struct Functions {
            $( $name: unsafe extern "C" fn($($ty),*) $(-> $ret)?, )*
        }

        impl Functions {
            /// Resolves every function in `handle`, the library `name`.
            ///
            /// # Safety
            ///
            /// `handle` is a `dlopen` handle of libvirt, whose functions have the C
            /// signatures declared here (libvirt's ABI is stable: see the module docs).
            unsafe fn resolve(handle: *mut c_void, name: &str) -> Result<Self, String> {
                Ok(Functions {
                    $( $name: {
                        // SAFETY: a valid handle and a NUL-terminated name.
                        let sym = unsafe {
                            libc::dlsym(handle, concat!(stringify!($name), "\0").as_ptr().cast())
                        };
                        if sym.is_null() {
                            return Err(format!("{name} has no {}", stringify!($name)));
                        }
                        // SAFETY: the symbol is that function (the caller's contract).
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(sym)
                        }
                    }, )*
                })
            }
        }

        $(
            /// libvirt's function of this name.
            ///
            /// # Safety
            ///
            /// As libvirt documents it; and [`load`] succeeded first.
            #[allow(non_snake_case)]
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller's.
                unsafe { (functions().$name)($($arg),*) }
            }
        )*
    };
}

libvirt_functions! {
    fn virConnectOpen(name: *const c_char) -> virConnectPtr;
    fn virConnectClose(conn: virConnectPtr) -> c_int;
    fn virConnectIsAlive(conn: virConnectPtr) -> c_int;
    fn virConnectGetLibVersion(conn: virConnectPtr, lib_ver: *mut c_ulong) -> c_int;
    fn virConnectListAllDomains(conn: virConnectPtr, domains: *mut *mut virDomainPtr, flags: c_uint) -> c_int;
    fn virConnectGetAllDomainStats(conn: virConnectPtr, stats: c_uint, ret_stats: *mut *mut *mut virDomainStatsRecord, flags: c_uint) -> c_int;
    fn virDomainStatsRecordListFree(stats: *mut *mut virDomainStatsRecord);
    fn virDomainLookupByName(conn: virConnectPtr, name: *const c_char) -> virDomainPtr;
    fn virDomainLookupByUUIDString(conn: virConnectPtr, uuid: *const c_char) -> virDomainPtr;
    fn virDomainDefineXML(conn: virConnectPtr, xml: *const c_char) -> virDomainPtr;
    fn virDomainRestore(conn: virConnectPtr, from: *const c_char) -> c_int;
    fn virDomainRef(domain: virDomainPtr) -> c_int;
    fn virDomainFree(domain: virDomainPtr) -> c_int;
    fn virDomainGetName(domain: virDomainPtr) -> *const c_char;
    fn virDomainGetUUIDString(domain: virDomainPtr, buf: *mut c_char) -> c_int;
    fn virDomainGetID(domain: virDomainPtr) -> c_uint;
    fn virDomainGetState(domain: virDomainPtr, state: *mut c_int, reason: *mut c_int, flags: c_uint) -> c_int;
    fn virDomainGetInfo(domain: virDomainPtr, info: *mut virDomainInfo) -> c_int;
    fn virDomainGetXMLDesc(domain: virDomainPtr, flags: c_uint) -> *mut c_char;
    fn virDomainGetVcpusFlags(domain: virDomainPtr, flags: c_uint) -> c_int;
    fn virDomainGetMetadata(domain: virDomainPtr, type_: c_int, uri: *const c_char, flags: c_uint) -> *mut c_char;
    fn virDomainSetMetadata(domain: virDomainPtr, type_: c_int, metadata: *const c_char, key: *const c_char, uri: *const c_char, flags: c_uint) -> c_int;
    fn virDomainCreate(domain: virDomainPtr) -> c_int;
    fn virDomainIsPersistent(domain: virDomainPtr) -> c_int;
    fn virDomainShutdown(domain: virDomainPtr) -> c_int;
    fn virDomainDestroy(domain: virDomainPtr) -> c_int;
    fn virDomainUndefineFlags(domain: virDomainPtr, flags: c_uint) -> c_int;
    fn virDomainSave(domain: virDomainPtr, to: *const c_char) -> c_int;
    fn virDomainSuspend(domain: virDomainPtr) -> c_int;
    fn virDomainResume(domain: virDomainPtr) -> c_int;
    fn virDomainSetMemoryFlags(domain: virDomainPtr, memory: c_ulong, flags: c_uint) -> c_int;
    fn virDomainSetMemoryStatsPeriod(domain: virDomainPtr, period: c_int, flags: c_uint) -> c_int;
    fn virDomainMemoryStats(domain: virDomainPtr, stats: *mut virDomainMemoryStatStruct, nr_stats: c_uint, flags: c_uint) -> c_int;
    fn virDomainPinVcpuFlags(domain: virDomainPtr, vcpu: c_uint, cpumap: *mut c_uchar, maplen: c_int, flags: c_uint) -> c_int;
    fn virDomainGetVcpuPinInfo(domain: virDomainPtr, ncpumaps: c_int, cpumaps: *mut c_uchar, maplen: c_int, flags: c_uint) -> c_int;
    fn virGetLastErrorCode() -> c_int;
    fn virGetLastErrorMessage() -> *const c_char;
    fn virResetLastError();
    fn virSetErrorFunc(user_data: *mut c_void, handler: virErrorFunc);
}

static LIBVIRT: OnceLock<Result<Functions, String>> = OnceLock::new();

/// Opens libvirt's library and resolves its functions, once; every call after the first
/// returns the first one's answer.
pub fn load() -> Result<(), String> {
    LIBVIRT
        .get_or_init(|| open(LIBRARY))
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// Opens the library `name` (kept open for the process's life) and resolves the functions.
fn open(name: &str) -> Result<Functions, String> {
    let c = CString::new(name).map_err(|_| format!("{name:?}: a NUL in the name"))?;
    // SAFETY: a valid NUL-terminated name.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns null or a NUL-terminated message, copied at once.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_owned()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!(
            "cannot open {name} (libvirt's client library, package libvirt0): {why}"
        ));
    }
    // SAFETY: libvirt's own library, whose functions have these signatures; any other
    // library lacks at least one of the names and is refused by name.
    unsafe { Functions::resolve(handle, name) }
}

fn functions() -> &'static Functions {
    match LIBVIRT.get() {
        Some(Ok(f)) => f,
        // Unreachable: the only way to a libvirt object is `Connection::open`, which loads
        // the library first and fails when it cannot.
        _ => unreachable!("libvirt called before ffi::load succeeded"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_library_is_named_with_its_package() {
        let Err(e) = super::open("libvirt-not-here.so.0") else {
            panic!("opened a library that does not exist");
        };
        assert!(
            e.starts_with(
                "cannot open libvirt-not-here.so.0 (libvirt's client library, package libvirt0): "
            ),
            "{e}"
        );
    }

    #[test]
    fn a_library_that_is_not_libvirt_is_refused_by_the_first_missing_name() {
        let Err(e) = super::open("libc.so.6") else {
            panic!("libc taken for libvirt");
        };
        assert_eq!(e, "libc.so.6 has no virConnectOpen");
    }
}
