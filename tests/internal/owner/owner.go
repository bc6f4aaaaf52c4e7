// Package owner records which process owns a test harness's directory, so that a cleanup run
// after a killed test removes what the dead process left and never what a live one uses: the
// owner file holds the process's pid and its start time (field 22 of /proc/PID/stat), which
// together survive pid reuse. tests/controlplane and tests/k8s share it.
package owner

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Write records this process as the owner of dir, in dir/file.
func Write(dir, file string) error {
	start, err := ProcStart(os.Getpid())
	if err != nil {
		return fmt.Errorf("write owner: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, file), fmt.Appendf(nil, "%d %d\n", os.Getpid(), start), 0o600); err != nil {
		return fmt.Errorf("write owner: %w", err)
	}
	return nil
}

// Alive reports whether the process recorded in dir/file still runs. A directory without a
// readable owner file counts as alive while it is younger than grace (its owner may be about
// to write it).
func Alive(dir, file string, grace time.Duration) bool {
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		st, err := os.Stat(dir)
		return err == nil && time.Since(st.ModTime()) < grace
	}
	var pid int
	var start uint64
	if _, err := fmt.Sscanf(string(b), "%d %d", &pid, &start); err != nil || pid <= 0 {
		return false
	}
	got, err := ProcStart(pid)
	return err == nil && got == start
}

// ProcStart returns field 22 of /proc/PID/stat, the process's start time in clock ticks since
// boot.
func ProcStart(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces; fields after the last
	// ')' start with field 3.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat: no ')'", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(fields))
	}
	return strconv.ParseUint(fields[19], 10, 64)
}
