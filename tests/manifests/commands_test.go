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

// docCommand is a meshcrypt or meshcrypt-agent command line found in a fenced code block.
type docCommand struct {
	where string // file:line
	bin   string
	args  []string
}

// docCommands extracts the command lines of fenced code blocks in README.md and docs/*.md:
// lines (prompt "$ " stripped, continuations joined) whose command, or a command after &&,
// ||, ;, | or kubectl's "--", is meshcrypt, kubectl-meshcrypt, `kubectl meshcrypt` or
// meshcrypt-agent (also as bin/meshcrypt and the like).
func docCommands(t *testing.T) []docCommand {
	t.Helper()
	files, err := filepath.Glob(path(t, "docs/*.md"))
	if err != nil {
		t.Fatal(err)
	}
	files = append([]string{path(t, "README.md")}, files...)
	var out []docCommand
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root(t), f)
		fenced := false
		var cont strings.Builder
		start := 0
		for i, l := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(strings.TrimSpace(l), "```") {
				fenced = !fenced
				continue
			}
			if !fenced {
				continue
			}
			if cont.Len() == 0 {
				start = i + 1
			}
			line := strings.TrimSpace(l)
			if strings.HasSuffix(line, "\\") {
				cont.WriteString(strings.TrimSuffix(line, "\\") + " ")
				continue
			}
			cont.WriteString(line)
			full := cont.String()
			cont.Reset()
			for _, c := range lineCommands(full) {
				c.where = fmt.Sprintf("%s:%d", rel, start)
				out = append(out, c)
			}
		}
	}
	return out
}

// lineCommands returns the meshcrypt commands of one shell line ("$ " prompt allowed).
func lineCommands(line string) []docCommand {
	var out []docCommand
	for _, seg := range splitShell(strings.TrimPrefix(line, "$ ")) {
		if bin, args, ok := meshcryptCommand(seg); ok {
			out = append(out, docCommand{bin: bin, args: args})
		}
	}
	return out
}

// splitShell splits a shell line into the words of each simple command, honouring quotes and
// dropping a trailing comment.
func splitShell(line string) [][]string {
	var cmds [][]string
	var words []string
	var w strings.Builder
	inWord := false
	flushWord := func() {
		if inWord {
			words = append(words, w.String())
			w.Reset()
			inWord = false
		}
	}
	flushCmd := func() {
		flushWord()
		if len(words) > 0 {
			cmds = append(cmds, words)
		}
		words = nil
	}
	var quote rune
	for _, r := range line {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				w.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == '#' && !inWord:
			flushCmd()
			return cmds
		case r == ' ' || r == '\t':
			flushWord()
		case r == ';' || r == '|' || r == '&':
			flushCmd()
		case r == '>' || r == '<':
			flushCmd()
			return cmds // what follows is a redirection target
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	flushCmd()
	return cmds
}

var envAssignment = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// meshcryptCommand recognises a meshcrypt or meshcrypt-agent invocation among words.
func meshcryptCommand(words []string) (bin string, args []string, ok bool) {
	for i := 0; i < len(words); i++ {
		w := words[i]
		if envAssignment.MatchString(w) || w == "sudo" || w == "watch" {
			continue
		}
		switch filepath.Base(w) {
		case "meshcrypt", "kubectl-meshcrypt":
			return "meshcrypt", words[i+1:], true
		case "meshcrypt-agent":
			return "meshcrypt-agent", words[i+1:], true
		case "kubectl":
			if i+1 < len(words) && words[i+1] == "meshcrypt" {
				return "meshcrypt", words[i+2:], true
			}
			for j := i + 1; j < len(words); j++ {
				if words[j] == "--" {
					return meshcryptCommand(words[j+1:])
				}
			}
		}
		return "", nil, false
	}
	return "", nil, false
}

// TestDocCommands runs every meshcrypt and meshcrypt-agent command line of the docs with
// --help against the binaries: no doc may name a command or flag that does not exist.
func TestDocCommands(t *testing.T) {
	cmds := docCommands(t)
	if len(cmds) < 10 {
		t.Fatalf("found only %d command lines in the docs; is the extraction broken?", len(cmds))
	}
	for _, c := range cmds {
		t.Run(c.where, func(t *testing.T) {
			if err := checkCommand(t, c.bin, c.args); err != nil {
				t.Errorf("%s: %v", c.where, err)
			}
		})
	}
}

// TestCheckCommand: the checker itself refuses what does not exist.
func TestCheckCommand(t *testing.T) {
	for _, tt := range []struct {
		bin  string
		args string
		ok   bool
	}{
		{"meshcrypt", "status -o json", true},
		{"meshcrypt", "status --output=json --kubeconfig /tmp/k", true},
		{"meshcrypt", "encryption enable --mode wireguard --wait --timeout 10m", true},
		{"meshcrypt", "policy check --from default/a --to default/b --port 80/TCP", true},
		{"meshcrypt-agent", "--cluster-id=2 --attach-mode tc", true},
		{"meshcrypt-agent", "wireguard-device --iface wg0", true},
		{"meshcrypt", "keys rotate", false},
		{"meshcrypt", "status --bogus", false},
		{"meshcrypt", "status extra", false},
		{"meshcrypt", "encryption enable --timeout soon", false},
		{"meshcrypt-agent", "--no-such-flag", false},
	} {
		err := checkCommand(t, tt.bin, strings.Fields(tt.args))
		if (err == nil) != tt.ok {
			t.Errorf("%s %s: err = %v, want ok=%v", tt.bin, tt.args, err, tt.ok)
		}
	}
	// Extraction.
	for _, tt := range []struct {
		line string
		want string
	}{
		{"$ meshcrypt status -o json | jq .compliant", "meshcrypt [status -o json]"},
		{"kubectl meshcrypt identities", "meshcrypt [identities]"},
		{"kubectl -n meshcrypt exec ds/meshcrypt-agent -- meshcrypt-agent --help", "meshcrypt-agent [--help]"},
		{"KUBECONFIG=~/.kube/prod meshcrypt status # the verdict first", "meshcrypt [status]"},
		{"make demo   # then `meshcrypt status`", ""},
		{"meshcrypt-agent-x7k2p   1/1   Running", ""},
	} {
		var got []string
		for _, c := range lineCommands(tt.line) {
			got = append(got, fmt.Sprintf("%s %v", c.bin, c.args))
		}
		if strings.Join(got, "; ") != tt.want {
			t.Errorf("%q: extracted %q, want %q", tt.line, got, tt.want)
		}
	}
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
