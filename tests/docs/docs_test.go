package docs

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshcrypt/meshcrypt/tests/internal/helpcheck"
)

func TestMain(m *testing.M) {
	code := m.Run()
	helpcheck.Cleanup()
	os.Exit(code)
}

// TestDocCommands: every meshcrypt and meshcrypt-agent command line of the docs exists.
func TestDocCommands(t *testing.T) {
	root := helpcheck.RepoRoot(t)
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
			if err := helpcheck.Check(t, c.Bin, c.Args); err != nil {
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
	root := helpcheck.RepoRoot(t)
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
		err := helpcheck.Check(t, tt.bin, strings.Fields(tt.args))
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
		path, args := helpcheck.ParseUsage(tt.usage)
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
