// Package helpcheck checks command lines against the project's real binaries: it runs
// `meshcrypt ... --help` (or meshcrypt-agent) and tells whether every command, flag and
// argument of the line exists. tests/docs checks the docs' commands with it, tests/manifests
// the agent arguments of the Helm chart. It is imported only from tests.
package helpcheck

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
)

// RepoRoot is the module's root directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// The binaries: $MESHCRYPT_BIN_DIR, else built once into a temporary directory.
var (
	binOnce  sync.Once
	binDir   string
	binBuilt bool
	binErr   error
)

// Cleanup removes the binaries Binary built; call it from TestMain after m.Run.
func Cleanup() {
	if binBuilt {
		os.RemoveAll(binDir)
	}
}

// Binary returns the path of meshcrypt or meshcrypt-agent: from $MESHCRYPT_BIN_DIR, else
// built once per test process into a temporary directory (see Cleanup).
func Binary(t testing.TB, name string) string {
	t.Helper()
	binOnce.Do(func() {
		if binDir = os.Getenv("MESHCRYPT_BIN_DIR"); binDir != "" {
			return
		}
		if binDir, binErr = os.MkdirTemp("", "meshcrypt-docs-bin-"); binErr != nil {
			return
		}
		binBuilt = true
		cmd := exec.Command("go", "build", "-o", binDir+"/", "./cmd/meshcrypt", "./cmd/meshcrypt-agent")
		cmd.Dir = RepoRoot(t)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	p := filepath.Join(binDir, name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("binary %s: %v (run make build, or unset MESHCRYPT_BIN_DIR)", name, err)
	}
	return p
}

// help is what a cobra help text says about its command.
type help struct {
	usage string
	// path are the words of the command's path after the binary's name.
	path []string
	// args is true when the usage line shows positional arguments after the path.
	args bool
	// parent is true when the command has subcommands (and so takes no arguments).
	parent bool
	flags  map[string]bool   // long name -> takes a value
	short  map[string]string // shorthand -> long name
}

var (
	flagLine    = regexp.MustCompile(`^\s+(?:-([a-zA-Z0-9]), )?--([a-zA-Z0-9-]+)(?: ([a-zA-Z0-9]+))?(?:\s{2,}|$)`)
	commandWord = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`)
	usageFlags  = regexp.MustCompile(`\[-[^\]]*\]`)
)

func parseHelp(s string) help {
	h := help{flags: map[string]bool{}, short: map[string]string{}}
	section := ""
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		l := sc.Text()
		if strings.TrimSpace(l) == "" {
			section = ""
			continue
		}
		if !strings.HasPrefix(l, " ") && strings.HasSuffix(l, ":") {
			section = l
			if section == "Available Commands:" {
				// A parent command: cobra resolved every subcommand named, so any
				// positional word left is not one.
				h.parent = true
			}
			continue
		}
		switch section {
		case "Usage:":
			if h.usage == "" {
				h.usage = strings.TrimSpace(l)
				h.path, h.args = ParseUsage(h.usage)
			}
		case "Flags:", "Global Flags:":
			if m := flagLine.FindStringSubmatch(l); m != nil {
				h.flags[m[2]] = m[3] != ""
				if m[1] != "" {
					h.short[m[1]] = m[2]
				}
			}
		}
	}
	return h
}

// ParseUsage splits a cobra usage line ("meshcrypt keys rotate [--all] NODE [flags]") into
// the command's path after the binary's name (or names: "kubectl meshcrypt") and whether
// positional arguments follow it.
func ParseUsage(usage string) (path []string, args bool) {
	words := strings.Fields(usageFlags.ReplaceAllString(usage, " "))
	if len(words) > 1 && words[0] == "kubectl" {
		words = words[1:]
	}
	i := 1
	for ; i < len(words) && commandWord.MatchString(words[i]); i++ {
		path = append(path, words[i])
	}
	for ; i < len(words); i++ {
		switch w := words[i]; {
		case strings.HasPrefix(w, "-"):
			if i+1 < len(words) && !strings.HasPrefix(words[i+1], "-") && !strings.HasPrefix(words[i+1], "[") {
				i++ // a flag's value in the usage line: --from NS/POD
			}
		case w == "[flags]":
		default:
			args = true
		}
	}
	return path, args
}

// placeholder is a flag value written as a placeholder: N, NAME, NS/POD, PORT/PROTO.
var placeholder = regexp.MustCompile(`^[A-Z][A-Z0-9_]*(?:/[A-Z][A-Z0-9_]*)*$`)

// invalidFlagValue is cobra's (pflag's) error for a value its flag's type refuses.
var invalidFlagValue = regexp.MustCompile(`invalid argument "([^"]*)" for "(?:-[a-zA-Z0-9], )?--([a-zA-Z0-9-]+)" flag`)

// Check runs `bin args... --help` and checks every word of args against the help of the
// command they name: cobra itself refuses an unknown command, flag or malformed flag value,
// even with --help; check refuses a positional word that is neither the command's path nor
// an argument its usage line shows. A placeholder given to a typed flag (--mtu N) is left
// out of the run; the flag's name is still checked.
func Check(t testing.TB, bin string, args []string) error {
	t.Helper()
	runArgs := append([]string(nil), args...)
	var stdout, stderr bytes.Buffer
	for {
		// --help twice: a value flag at the end of the line (`--fips-path`) takes the first
		// as its value, and the command still only prints its help, never runs.
		cmd := exec.Command(Binary(t, bin), append(append([]string(nil), runArgs...), "--help", "--help")...)
		cmd.Env = append(os.Environ(), "KUBECONFIG=/nonexistent", "HOME="+t.TempDir(), "NODE_NAME=")
		stdout.Reset()
		stderr.Reset()
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		if err == nil {
			break
		}
		if m := invalidFlagValue.FindStringSubmatch(stderr.String()); m != nil && placeholder.MatchString(m[1]) {
			if i := slices.Index(runArgs, m[1]); i > 0 && strings.TrimLeft(runArgs[i-1], "-") == m[2] {
				runArgs = slices.Delete(runArgs, i-1, i+1)
				continue
			}
		}
		return fmt.Errorf("%s %s --help: %v: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	h := parseHelp(stdout.String())
	if h.usage == "" {
		return fmt.Errorf("%s %s --help printed no usage line:\n%s", bin, strings.Join(args, " "), stdout.String())
	}
	matched := 0
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			if !h.args {
				return fmt.Errorf("%s: arguments after -- but %q takes none", bin, h.usage)
			}
			return nil
		case strings.HasPrefix(a, "--"):
			name, _, hasValue := strings.Cut(a[2:], "=")
			takesValue, ok := h.flags[name]
			if !ok {
				// Cobra accepted it, so it is a hidden flag; a following word that is
				// not the command's next path word is taken as its value.
				takesValue = i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") &&
					!(matched < len(h.path) && args[i+1] == h.path[matched])
			}
			if takesValue && !hasValue {
				i++
			}
		case strings.HasPrefix(a, "-") && len(a) >= 2:
			name, ok := h.short[a[1:2]]
			if !ok {
				return fmt.Errorf("%s: flag %s is not in the help of %q", bin, a[:2], h.usage)
			}
			if h.flags[name] && len(a) == 2 {
				i++
			}
		case matched < len(h.path) && a == h.path[matched]:
			matched++
		case matched == len(h.path) && h.args && !h.parent:
			// a positional argument the usage line announces
		default:
			return fmt.Errorf("%s %s: %q is neither a command nor a flag value (usage: %s)", bin, strings.Join(args, " "), a, h.usage)
		}
	}
	return nil
}
