//! x86-64 guest setup: memory layout and everything the boot vCPU finds
//! when it starts (see `boot::setup_boot`), plus per-vCPU CPUID and MSRs.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod elf;
pub mod gdt;
pub mod kernel;
pub mod layout;
pub mod msrs;
pub mod paging;
pub mod pvh;
pub mod regs;
pub mod reset_vector;
pub mod zero_page;
