// Package crashtest crashes in the VM: a panic on a goroutine kills the test
// binary in the middle of a test, which the VM harness must report as a
// failure. On the host it does nothing.
package crashtest

import (
	"os"
	"testing"
	"time"
)

func TestBeforeCrash(t *testing.T) {}

func TestCrash(t *testing.T) {
	if os.Getenv("MESHCRYPT_VM") != "1" {
		t.Skip("crashes only in the VM (tests/vm)")
	}
	t.Log("about to crash")
	go panic("crashing on purpose")
	time.Sleep(time.Minute)
}
