package docs

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

	"github.com/google/go-cmp/cmp"
)

// repoRoot is the module's root directory.
func repoRoot(t *testing.T) string {
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

func TestMain(m *testing.M) {
	code := m.Run()
	if binBuilt {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

func binary(t *testing.T, name string) string {
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
		cmd.Dir = repoRoot(t)
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
				h.path, h.args = parseUsage(h.usage)
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

// parseUsage splits a cobra usage line ("meshcrypt keys rotate [--all] NODE [flags]") into
// the command's path after the binary's name (or names: "kubectl meshcrypt") and whether
// positional arguments follow it.
func parseUsage(usage string) (path []string, args bool) {
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

// check runs `bin args... --help` and checks every word of args against the help of the
// command they name: cobra itself refuses an unknown command, flag or malformed flag value,
// even with --help; check refuses a positional word that is neither the command's path nor
// an argument its usage line shows. A placeholder given to a typed flag (--mtu N) is left
// out of the run; the flag's name is still checked.
func check(t *testing.T, bin string, args []string) error {
	t.Helper()
	runArgs := append([]string(nil), args...)
	var stdout, stderr bytes.Buffer
	for {
		// --help twice: a value flag at the end of the line (`--fips-path`) takes the first
		// as its value, and the command still only prints its help, never runs.
		cmd := exec.Command(binary(t, bin), append(append([]string(nil), runArgs...), "--help", "--help")...)
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

// TestDocCommands: every meshcrypt and meshcrypt-agent command line of the docs exists.
func TestDocCommands(t *testing.T) {
	root := repoRoot(t)
	files, err := markdownFiles(root)
	if err != nil {
		t.Fatal(err)
	}
	cmds, err := extract(root, files)
	if err != nil {
		t.Fatal(err)
	}
	var fenced, inline int
	for _, c := range cmds {
		if c.Bin == "make" {
			continue
		}
		if c.Planned {
			t.Logf("%s: planned, not checked: %s", c.Where, c)
			continue
		}
		if c.Inline {
			inline++
		} else {
			fenced++
		}
		t.Run(c.Where+" "+c.String(), func(t *testing.T) {
			if err := check(t, c.Bin, c.Args); err != nil {
				kind := "code block"
				if c.Inline {
					kind = "inline code (mark it planned outside code, or remove it)"
				}
				t.Errorf("%s: %s: %v", c.Where, kind, err)
			}
		})
	}
	// Guard the extraction itself: the docs hold many commands of both kinds.
	if fenced < 15 || inline < 8 {
		t.Errorf("found %d command lines in code blocks and %d in inline code; is the extraction broken?", fenced, inline)
	}
}

// TestDocMakeTargets: every `make TARGET` of the docs is a target of the Makefile.
func TestDocMakeTargets(t *testing.T) {
	root := repoRoot(t)
	targets, err := makeTargets(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	files, err := markdownFiles(root)
	if err != nil {
		t.Fatal(err)
	}
	cmds, err := extract(root, files)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range cmds {
		if c.Bin != "make" || c.Planned {
			continue
		}
		for i := 0; i < len(c.Args); i++ {
			a := c.Args[i]
			switch {
			case a == "-C" || a == "-f" || a == "-j":
				i++
			case strings.HasPrefix(a, "-") || envAssignment.MatchString(a):
			case !targets[a]:
				t.Errorf("%s: make %s: the Makefile has no target %q", c.Where, strings.Join(c.Args, " "), a)
			default:
				n++
			}
		}
	}
	if n < 5 {
		t.Errorf("found only %d make targets in the docs; is the extraction broken?", n)
	}
}

// TestCheck: the checker refuses what does not exist and accepts what does.
func TestCheck(t *testing.T) {
	for _, tt := range []struct {
		bin  string
		args string
		ok   bool
	}{
		{"meshcrypt", "status -o json", true},
		{"meshcrypt", "status --output=yaml --kubeconfig /tmp/k --node n1", true},
		{"meshcrypt", "--context prod status", true},
		{"meshcrypt", "encryption enable --mode wireguard --wait --timeout 10m", true},
		{"meshcrypt", "policy check --from default/a --to b --port 80/TCP", true},
		{"meshcrypt", "completion bash", true},
		{"meshcrypt", "help status", true},
		{"meshcrypt-agent", "--cluster-id=2 --attach-mode tc", true},
		{"meshcrypt-agent", "wireguard-device --iface wg0", true},
		{"meshcrypt-agent", "wireguard-device --iface X --mtu N", true},
		{"meshcrypt-agent", "wireguard-device --iface X --mtu many", false},
		{"meshcrypt-agent", "--fips-path", true},
		{"meshcrypt", "status -o", true},
		{"meshcrypt-agent", "wireguard-device --iface X --mtus N", false},
		{"meshcrypt", "no-such-command", false},
		{"meshcrypt", "encryption rotate", false},
		{"meshcrypt", "status --bogus", false},
		{"meshcrypt", "status -x", false},
		{"meshcrypt", "status extra", false},
		{"meshcrypt", "completion tcsh", false},
		{"meshcrypt", "encryption enable --timeout soon", false},
		{"meshcrypt-agent", "--no-such-flag", false},
	} {
		err := check(t, tt.bin, strings.Fields(tt.args))
		if (err == nil) != tt.ok {
			t.Errorf("%s %s: err = %v, want ok=%v", tt.bin, tt.args, err, tt.ok)
		}
	}
}

func TestParseUsage(t *testing.T) {
	for _, tt := range []struct {
		usage string
		path  []string
		args  bool
	}{
		{"meshcrypt status [--node NAME] [-o table|json|yaml] [flags]", []string{"status"}, false},
		{"kubectl meshcrypt status [flags]", []string{"status"}, false},
		{"meshcrypt policy check --from NS/POD --to NS/POD --port PORT/PROTO [flags]", []string{"policy", "check"}, false},
		{"meshcrypt encryption enable --mode wireguard [--wait] [flags]", []string{"encryption", "enable"}, false},
		{"meshcrypt keys rotate NODE [flags]", []string{"keys", "rotate"}, true},
		{"meshcrypt help [command] [flags]", []string{"help"}, true},
		{"meshcrypt-agent [flags]", nil, false},
	} {
		path, args := parseUsage(tt.usage)
		if !cmp.Equal(path, tt.path) || args != tt.args {
			t.Errorf("parseUsage(%q) = %q, %v; want %q, %v", tt.usage, path, args, tt.path, tt.args)
		}
	}
}

// TestExtract: what counts as a command line, in code blocks and inline code.
func TestExtract(t *testing.T) {
	doc := strings.Join([]string{
		"# Title with `meshcrypt status`", // 1
		"",                                // 2
		"Run `meshcrypt status -o json` or `kubectl meshcrypt identities`",            // 3
		"in the `meshcrypt` namespace, see `meshcrypt_peers` and `make demo KEEP=1`.", // 4
		"",      // 5
		"```sh", // 6
		"$ meshcrypt status -o json | jq .compliant",                             // 7
		"kubectl -n meshcrypt exec ds/meshcrypt-agent -- meshcrypt-agent --help", // 8
		"KUBECONFIG=~/.kube/prod meshcrypt status # the verdict first",           // 9
		"meshcrypt encryption enable \\",                                         // 10
		"  --mode wireguard --wait",                                              // 11
		"source <(meshcrypt completion bash)",                                    // 12
		"cat > x <<'EOF'",                                                        // 13
		"meshcrypt not-a-command-inside-a-heredoc",                               // 14
		"EOF",                                   // 15
		"bin/meshcrypt status 2>&1 >/dev/null",  // 16
		"make demo   # then `meshcrypt status`", // 17
		"```",                                   // 18
		"",                                      // 19
		"```yaml",                               // 20
		"command: [meshcrypt, status]",          // 21
		"```",                                   // 22
		"",                                      // 23
		"```",                                   // 24
		"meshcrypt-agent-x7k2p   1/1   Running", // 25
		"NOT compliant: 1 of 3 node pairs not encrypted", // 26
		"```",                // 27
		"",                   // 28
		"| command | what |", // 29
		"| `meshcrypt keys rotate --all` | planned |",                         // 30
		"| `meshcrypt encryption enable --mode wireguard\\|ipsec` | switch |", // 31
		"", // 32
		"- `meshcrypt verify --all-pairs` (planned, not in the CLI yet)", // 33
		"- `meshcrypt status [-o json]`, which",                          // 34
		"  spans `meshcrypt policy check",                                // 35
		"  --from a --to b --port 80/TCP` lines",                         // 36
	}, "\n")
	var got []string
	for _, c := range extractMarkdown("x.md", doc) {
		kind := "block"
		if c.Inline {
			kind = "inline"
		}
		if c.Planned {
			kind += " planned"
		}
		got = append(got, fmt.Sprintf("%s %s %s %q", c.Where, kind, c.Bin, c.Args))
	}
	want := []string{
		`x.md:1 inline meshcrypt ["status"]`,
		`x.md:3 inline meshcrypt ["status" "-o" "json"]`,
		`x.md:3 inline meshcrypt ["identities"]`,
		`x.md:4 inline make ["demo" "KEEP=1"]`,
		`x.md:7 block meshcrypt ["status" "-o" "json"]`,
		`x.md:8 block meshcrypt-agent ["--help"]`,
		`x.md:9 block meshcrypt ["status"]`,
		`x.md:10 block meshcrypt ["encryption" "enable" "--mode" "wireguard" "--wait"]`,
		`x.md:12 block meshcrypt ["completion" "bash"]`,
		`x.md:16 block meshcrypt ["status"]`,
		`x.md:17 block make ["demo"]`,
		`x.md:30 inline planned meshcrypt ["keys" "rotate" "--all"]`,
		`x.md:31 inline meshcrypt ["encryption" "enable" "--mode" "wireguard"]`,
		`x.md:33 inline planned meshcrypt ["verify" "--all-pairs"]`,
		`x.md:34 inline meshcrypt ["status" "-o" "json"]`,
		`x.md:35 inline meshcrypt ["policy" "check" "--from" "a" "--to" "b" "--port" "80/TCP"]`,
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}
