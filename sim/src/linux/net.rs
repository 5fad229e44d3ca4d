//! The `linux-net` guest's part of `/init`.

/// The shell lines of the `linux-net` workload.
pub fn script() -> String {
    String::from("echo \"HVSIM check linux-net fail not written yet\"\n")
}
