// Package selftest holds the tests the VM harness (tests/vm) boots to check
// itself: tests that pass, skip, fail on request, run subtests in parallel and
// print awkward output exercise the results protocol, and TestGuest checks that
// the guest offers what the kernel suites rely on (mounts, loaded modules,
// module autoloading, an ESP state with AES-GCM).
//
// On the host (outside the VM) the guest checks skip and nothing fails.
package selftest
