//! The `linux-console` guest's part of `/init`.

/// The shell lines of the `linux-console` workload.
pub fn script() -> String {
    String::from("echo \"HVSIM check linux-console fail not written yet\"\n")
}
