//! What every eBPF object of ferry carries: its license (the kernel's GPL-only helpers need a
//! GPL-compatible one) and the panic handler `no_std` requires (never reached: the verifier
//! rejects code that could panic).

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
