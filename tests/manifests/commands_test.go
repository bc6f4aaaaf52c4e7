package manifests

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// The binaries, built once per test binary into binDir.
var (
	binDir  string
	binOnce sync.Once
	binErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// binary returns the path of a freshly built meshcrypt or meshcrypt-agent.
func binary(t *testing.T, name string) string {
	t.Helper()
	binOnce.Do(func() {
		if binDir, binErr = os.MkdirTemp("", "meshcrypt-manifests-bin-"); binErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+"/", "./cmd/meshcrypt", "./cmd/meshcrypt-agent")
		cmd.Dir = root(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return filepath.Join(binDir, name)
}

// checkCommand runs `bin args... --help`: cobra rejects an unknown command, an unknown flag
// or a malformed flag value even then, and prints the help of the command named. From that
// help it also rejects positional arguments (no meshcrypt command takes any).
func checkCommand(t *testing.T, bin string, args []string) error {
	t.Helper()
	cmd := exec.Command(binary(t, bin), append(append([]string(nil), args...), "--help")...)
	cmd.Env = append(os.Environ(), "KUBECONFIG=/nonexistent", "NODE_NAME=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s --help: %v: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	h := parseHelp(stdout.String())
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case strings.HasPrefix(a, "--"):
			name, _, hasValue := strings.Cut(a[2:], "=")
			takesValue, ok := h.flags[name]
			if !ok {
				return fmt.Errorf("%s: flag --%s not in the help of %q", bin, name, h.usage)
			}
			if takesValue && !hasValue {
				i++
			}
		case strings.HasPrefix(a, "-") && len(a) >= 2:
			name, ok := h.short[a[1:2]]
			if !ok {
				return fmt.Errorf("%s: flag %s not in the help of %q", bin, a[:2], h.usage)
			}
			if h.flags[name] && len(a) == 2 {
				i++
			}
		default:
			if !h.path[a] {
				return fmt.Errorf("%s %s: %q is neither a command nor a flag value (usage: %s)", bin, strings.Join(args, " "), a, h.usage)
			}
		}
	}
	return nil
}

// help is what a cobra help text says about its command.
type help struct {
	usage string
	path  map[string]bool   // the words of the command's own path (from the usage line)
	flags map[string]bool   // long name -> takes a value
	short map[string]string // shorthand -> long name
}

var flagLine = regexp.MustCompile(`^\s+(?:-([a-zA-Z0-9]), )?--([a-zA-Z0-9-]+)(?: ([a-zA-Z0-9]+))?(?:\s{2,}|$)`)

func parseHelp(s string) help {
	h := help{path: map[string]bool{}, flags: map[string]bool{}, short: map[string]string{}}
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
			continue
		}
		switch section {
		case "Usage:":
			if h.usage == "" {
				h.usage = strings.TrimSpace(l)
				for _, w := range strings.Fields(h.usage) {
					if strings.HasPrefix(w, "-") || strings.HasPrefix(w, "[") {
						break
					}
					h.path[w] = true
				}
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

// TestAgentArgs: every flag the chart passes to the agent (defaults and every value set)
// exists in meshcrypt-agent.
func TestAgentArgs(t *testing.T) {
	for _, v := range []struct {
		name   string
		values map[string]any
	}{{"defaults", nil}, {"all values", readValues(t, allValuesFile)}} {
		ds := find(t, parseObjects(t, v.name, []byte(mustRender(t, renderOptions{values: v.values}))), "DaemonSet")
		ctr := nested[map[string]any](t, ds, "spec", "template", "spec", "containers", "0")
		if ctr["command"] != nil {
			t.Errorf("%s: the DaemonSet overrides the image's entrypoint", v.name)
		}
		if err := checkCommand(t, "meshcrypt-agent", toStrings(ctr["args"])); err != nil {
			hint := ""
			if strings.Contains(err.Error(), "--metrics-addr") {
				hint = " (the agent must serve pkg/metrics's Server on --metrics-addr, default \":9962\"; the probes and the metrics Service use it)"
			}
			t.Errorf("%s: the DaemonSet's agent arguments: %v%s", v.name, err, hint)
		}
	}
}
