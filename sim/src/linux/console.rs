//! The `linux-console` guest's part of `/init`: an interactive shell on `/dev/hvc0` (Linux's
//! virtio_console driver), which the host reaches through the broker's pty.
//!
//! UML's own console (its stdout, where the `HVSIM` lines go) stays separate: only the shell
//! is on hvc0. `/init` reports `HVSIM check hvc0-shell pass` once the shell runs, then waits
//! for it to end (the user types `exit`), at most [`SESSION_S`] seconds, and powers off
//! without a final `sync`: a disk whose worker was killed during the session never completes
//! its requests, and nothing of the session needs flushing (it writes with `O_DIRECT`).
//!
//! With such a request still in flight, UML 6.1 prints `reboot: System halted` but never
//! exits (observed: it idles, its helper processes stay; with the dead device idle it exits
//! normally), so the simulator kills it once `HVSIM done` is some seconds old.

/// How long `/init` waits for the user to end the session before it kills the shell: long
/// sessions (a soak with a hundred worker kills, a 1 MiB echo) take minutes; the run's
/// `--timeout` ends a forgotten one first.
pub const SESSION_S: u32 = 3600;

/// The shell lines of the `linux-console` workload.
pub fn script() -> String {
    format!(
        r#"
console_session() {{
    i=0
    while [ ! -c /dev/hvc0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    check hvc0-present [ -c /dev/hvc0 ] || return
    # A session of its own with hvc0 as its controlling terminal: job control and ^C work.
    setsid -c sh -c 'PS1="hvc0$ " exec sh -i' </dev/hvc0 >/dev/hvc0 2>&1 &
    shell=$!
    echo "HVSIM check hvc0-shell pass pid $shell"
    (sleep {SESSION_S}; kill -9 $shell 2>/dev/null) &
    guard=$!
    wait $shell
    if kill $guard 2>/dev/null; then
        echo "HVSIM check hvc0-session pass the user ended the session"
    else
        echo "HVSIM check hvc0-session fail no exit on hvc0 within {SESSION_S} s"
    fi
}}
console_session
echo "HVSIM done"
poweroff -f
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shell_is_on_hvc0_and_init_powers_off_without_sync() {
        let s = super::script();
        assert!(s.contains("</dev/hvc0 >/dev/hvc0 2>&1 &"));
        assert!(s.trim_end().ends_with("poweroff -f"));
        assert!(!s.contains("\nsync"));
    }
}
