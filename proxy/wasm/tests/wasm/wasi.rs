//! The WASI stubs answer as Envoy's C++ host does, so runtimes that probe
//! them at start-up load and run as they do on Envoy.

use crate::sandbox::checks_pass;

/// Go's `wasip1` runtime (Go 1.24+, which the Go proxy-wasm SDK targets)
/// imports these, probes stdout with `fd_fdstat_get` and
/// `fd_fdstat_set_flags` when `os` starts, and sleeps with `poll_oneoff`,
/// stopping the program ("fatal error") when that returns an error. A module
/// with Go's imports loads, and each call answers as on Envoy.
#[test]
fn go_runtime_imports_load_and_answer_as_on_envoy() {
    let imports = r#"
  (import "wasi_snapshot_preview1" "sched_yield" (func $yield (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $env (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fdstat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_set_flags" (func $set_flags (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name" (func $prestat_name (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))"#;
    // Memory: a clock subscription at 256 (48 bytes, as Go's `usleep` makes),
    // its event at 512, the event count at 128, an fdstat at 1024.
    let checks = r#"
    (i32.store8 (i32.const 264) (i32.const 0))
    (i64.store (i32.const 280) (i64.const 1000000))
    (i32.store (i32.const 128) (i32.const -1))
    ;; Sleep 1 ms: success, no event (nothing is waited for in a worker).
    (call $expect (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 128)) (i32.const 0))
    (call $expect (i32.load (i32.const 128)) (i32.const 0))
    ;; stdout and stderr are write-only streams (rights FD_WRITE); nothing else exists.
    (i64.store (i32.const 1024) (i64.const -1))
    (call $expect (call $fdstat (i32.const 1) (i32.const 1024)) (i32.const 0))
    (call $expect (i32.load8_u (i32.const 1024)) (i32.const 0))
    (call $expect (i32.wrap_i64 (i64.load (i32.const 1032))) (i32.const 64))
    (call $expect (call $fdstat (i32.const 2) (i32.const 1024)) (i32.const 0))
    (call $expect (call $fdstat (i32.const 3) (i32.const 1024)) (i32.const 8))
    ;; Out of bounds: a fault, not a host panic.
    (call $expect (call $fdstat (i32.const 1) (i32.const -8)) (i32.const 21))
    (call $expect (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const -2)) (i32.const 21))
    ;; Go sets stdout non-blocking and goes on when that is not supported.
    (call $expect (call $set_flags (i32.const 1) (i32.const 4)) (i32.const 52))
    (call $expect (call $read (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)) (i32.const 52))
    (call $expect (call $prestat (i32.const 3) (i32.const 1024)) (i32.const 8))
    (call $expect (call $yield) (i32.const 0))
    ;; Clocks: realtime and monotonic; any other id is not supported.
    (call $expect (call $clock (i32.const 1) (i64.const 1) (i32.const 1024)) (i32.const 0))
    (call $expect (call $clock (i32.const 2) (i64.const 1) (i32.const 1024)) (i32.const 58))
    (i32.const 0)"#;
    checks_pass("gopher", imports, checks, "", &[]);
}
