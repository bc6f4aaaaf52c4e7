package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// runCLI runs the CLI in-process, exactly as main does, under the program name program.
func runCLI(t *testing.T, program string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(newRootCmdAs(program), args, &out, &errb)
	return out.String(), errb.String(), code
}

// The binary, built once per test run (or taken from $MESHCRYPT_BIN_DIR, as tests/cluster
// does), for what only a real process shows: argv[0] and shell completion.
var (
	cliBinOnce sync.Once
	cliBinPath string
	cliBinErr  error
)

// cliBinary returns the path of a meshcrypt binary that the test may copy but not change.
func cliBinary(t *testing.T) string {
	t.Helper()
	cliBinOnce.Do(func() {
		if dir := os.Getenv("MESHCRYPT_BIN_DIR"); dir != "" {
			cliBinPath = filepath.Join(dir, "meshcrypt")
			_, cliBinErr = os.Stat(cliBinPath)
			return
		}
		dir, err := os.MkdirTemp("", "meshcrypt-cli-test-")
		if err != nil {
			cliBinErr = err
			return
		}
		cliBinPath = filepath.Join(dir, "meshcrypt")
		out, err := exec.Command("go", "build", "-o", cliBinPath, ".").CombinedOutput()
		if err != nil {
			cliBinErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if cliBinErr != nil {
		t.Fatal(cliBinErr)
	}
	return cliBinPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if cliBinPath != "" && os.Getenv("MESHCRYPT_BIN_DIR") == "" {
		os.RemoveAll(filepath.Dir(cliBinPath))
	}
	os.Exit(code)
}

// installAs copies the binary into a fresh directory under the name name.
func installAs(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(cliBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCommandName(t *testing.T) {
	tests := []struct {
		program, name, display string
	}{
		{"meshcrypt", "meshcrypt", "meshcrypt"},
		{"/usr/local/bin/meshcrypt", "meshcrypt", "meshcrypt"},
		{"./bin/kubectl-meshcrypt", "kubectl-meshcrypt", "kubectl meshcrypt"},
		{"/home/u/.krew/bin/kubectl-mesh_crypt-x", "kubectl-mesh_crypt-x", "kubectl mesh-crypt x"},
		{"kubectl-", "kubectl-", "kubectl-"},
		{"", "meshcrypt", "meshcrypt"},
	}
	for _, tt := range tests {
		name, display := commandName(tt.program)
		if name != tt.name || display != tt.display {
			t.Errorf("commandName(%q) = %q, %q; want %q, %q", tt.program, name, display, tt.name, tt.display)
		}
	}
}

// TestKubectlPlugin: the binary installed as kubectl-meshcrypt speaks of itself as
// `kubectl meshcrypt` in every help text and error, as kubectl shows plugins.
func TestKubectlPlugin(t *testing.T) {
	plugin := installAs(t, "kubectl-meshcrypt")
	for _, args := range [][]string{{"--help"}, {"status", "--help"}, {"encryption", "enable", "--help"}, {"policy", "check", "--help"}} {
		out, err := exec.Command(plugin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl-meshcrypt %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		want := "kubectl meshcrypt " + strings.Join(args[:len(args)-1], " ")
		if !strings.Contains(string(out), "Usage:\n  "+strings.TrimSpace(want)) {
			t.Errorf("kubectl-meshcrypt %s: help lacks the usage %q:\n%s", strings.Join(args, " "), want, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(strings.TrimSpace(l), "meshcrypt ") {
				t.Errorf("kubectl-meshcrypt %s: a help line names the command without kubectl: %q", strings.Join(args, " "), l)
			}
		}
	}
	cmd := exec.Command(plugin, "status", "-o", "xml")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitError || !strings.HasPrefix(string(out), "kubectl meshcrypt: -o \"xml\"") {
		t.Errorf("kubectl-meshcrypt status -o xml: %v, output %q; want exit %d and the error prefixed with `kubectl meshcrypt:`", err, out, exitError)
	}
	// Named meshcrypt, it says meshcrypt.
	out, err = exec.Command(installAs(t, "meshcrypt"), "status", "--help").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Usage:\n  meshcrypt status") {
		t.Errorf("meshcrypt status --help: %v\n%s", err, out)
	}
}

// TestCompletion: `completion SHELL` prints a script for every shell cobra supports, named
// after the program; the bash script is valid bash and completes commands and flag values.
func TestCompletion(t *testing.T) {
	for _, program := range []string{"meshcrypt", "kubectl-meshcrypt"} {
		for _, shell := range []string{"bash", "zsh", "fish", "powershell"} {
			out, errOut, code := runCLI(t, program, "completion", shell)
			if code != exitOK || errOut != "" {
				t.Fatalf("%s completion %s: exit %d: %s", program, shell, code, errOut)
			}
			if len(out) < 1000 || !strings.Contains(out, program) {
				t.Errorf("%s completion %s: %d bytes, naming the program: %v", program, shell, len(out), strings.Contains(out, program))
			}
			if shell == "bash" {
				script := filepath.Join(t.TempDir(), "completion.bash")
				if err := os.WriteFile(script, []byte(out), 0o644); err != nil {
					t.Fatal(err)
				}
				if b, err := exec.Command("bash", "-n", script).CombinedOutput(); err != nil {
					t.Errorf("%s completion bash: bash -n: %v\n%s", program, err, b)
				}
			}
		}
	}
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash to run the completion script in")
	}
	bin := installAs(t, "meshcrypt")
	// A stand-in for bash-completion's _get_comp_words_by_ref, which the script calls, so
	// the test does not need that package; then one completion as bash performs it.
	const drive = `
_get_comp_words_by_ref() { cur="${COMP_WORDS[COMP_CWORD]}"; prev="${COMP_WORDS[COMP_CWORD-1]}"; words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD; }
compopt() { :; }
source <(meshcrypt completion bash)
read -r -a COMP_WORDS <<<"$1"
[[ "$1" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
__start_meshcrypt
printf '%s\n' "${COMPREPLY[@]}"
`
	for _, tt := range []struct {
		line string
		want []string
	}{
		{"meshcrypt st", []string{"status"}},
		{"meshcrypt encryption ", []string{"disable", "enable"}},
		{"meshcrypt encryption enable --mode ", []string{"ipsec", "wireguard"}},
		{"meshcrypt status -o ", []string{"table", "json", "yaml"}},
		{"meshcrypt completion ", []string{"bash", "fish", "powershell", "zsh"}},
	} {
		cmd := exec.Command("bash", "-c", drive, "drive", tt.line)
		cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"), "KUBECONFIG=/nonexistent")
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("complete %q: %v", tt.line, err)
		}
		got := strings.Fields(string(out))
		if d := cmp.Diff(tt.want, got); d != "" {
			t.Errorf("complete %q (-want +got):\n%s", tt.line, d)
		}
	}
}

// TestBadInput: every bad input that needs no cluster is refused with exit status 2 and a
// message that names the input and what would be valid.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	unreachable := filepath.Join(dir, "unreachable")
	if err := os.WriteFile(unreachable, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}, {name: other, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBECONFIG", unreachable)
	tests := []struct {
		name string
		args string
		want string // the whole stderr
	}{
		{"unknown mode lists the valid ones", "encryption enable --mode foo",
			`meshcrypt: --mode "foo": unknown mode (valid modes: ipsec, wireguard)`},
		{"mode is required", "encryption enable", `meshcrypt: required flag(s) "mode" not set`},
		{"disabled is a command of its own", "encryption enable --mode disabled",
			"meshcrypt: --mode disabled: to turn encryption off, use the `encryption disable` command (valid modes: ipsec, wireguard)"},
		{"unknown output format", "status -o xml", `meshcrypt: -o "xml": want one of table, json, yaml`},
		{"unknown identities output format", "identities -o wide", `meshcrypt: -o "wide": want one of table, json, yaml`},
		{"status takes no arguments", "status node1", `meshcrypt: unknown command "node1" for "meshcrypt status"`},
		{"unknown command", "stauts", "meshcrypt: unknown command \"stauts\" for \"meshcrypt\"\n\nDid you mean this?\n\tstatus\n"},
		{"unknown flag", "status --nodes a", `meshcrypt: unknown flag: --nodes`},
		{"bad port", "policy check --from a --to b --port 70000/TCP", `meshcrypt: --port "70000/TCP": port must be 1-65535`},
		{"bad protocol", "policy check --from a --to b --port 80/SCTP", `meshcrypt: --port "80/SCTP": protocol must be TCP or UDP (or use ICMP alone)`},
		{"bad pod", "policy check --from default/ --to b --port 80/TCP",
			`meshcrypt: --from "default/": want a pod as NAMESPACE/NAME (or NAME in namespace default)`},
		{"unreachable API server, named", "status",
			"meshcrypt: cannot reach the Kubernetes API server at https://127.0.0.1:1: connection refused (is the cluster up, and is this the right kubeconfig and --context?)"},
		{"unreachable for every command", "encryption disable",
			"meshcrypt: cannot reach the Kubernetes API server at https://127.0.0.1:1: connection refused (is the cluster up, and is this the right kubeconfig and --context?)"},
		{"unknown context lists the known ones", "--context prod status",
			`meshcrypt: load kubeconfig: --context "prod": no such context (the kubeconfig has: c, other)`},
		{"missing --kubeconfig file", "--kubeconfig " + dir + "/nope status",
			"meshcrypt: --kubeconfig " + dir + "/nope: no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, code := runCLI(t, "meshcrypt", strings.Fields(tt.args)...)
			if code != exitError {
				t.Errorf("exit %d, want %d", code, exitError)
			}
			if strings.TrimRight(stderr, "\n") != strings.TrimRight(tt.want, "\n") {
				t.Errorf("stderr:\n%s\nwant:\n%s", stderr, tt.want)
			}
			if stdout != "" {
				t.Errorf("stdout %q, want nothing", stdout)
			}
		})
	}
	t.Run("KUBECONFIG names no file", func(t *testing.T) {
		t.Setenv("KUBECONFIG", dir+"/a:"+dir+"/b")
		_, stderr, code := runCLI(t, "meshcrypt", "status")
		want := fmt.Sprintf("meshcrypt: no kubeconfig: $KUBECONFIG is %q, but none of its files exists\n", dir+"/a:"+dir+"/b")
		if code != exitError || stderr != want {
			t.Errorf("exit %d, stderr %q; want %d, %q", code, stderr, exitError, want)
		}
	})
}

// TestDescribe: the raw errors of talking to a cluster become one sentence each.
func TestDescribe(t *testing.T) {
	forbidden := func(gr schema.GroupResource, msg string) error {
		return apierrors.NewForbidden(gr, "", errors.New(msg))
	}
	// What an http.Client through apiServerTransport returns.
	apiServer := func(err error) error {
		return &url.Error{Op: "Get", URL: "https://10.0.0.1:6443/api", Err: &apiServerError{server: "https://10.0.0.1:6443", err: err}}
	}
	refused := apiServer(&net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)})
	tests := []struct {
		name string
		err  error
		want string
	}{
		{
			"forbidden cluster-wide, wrapped",
			fmt.Errorf("list MeshNodes: %w", forbidden(schema.GroupResource{Group: "meshcrypt.io", Resource: "meshnodes"},
				`User "auditor" cannot list resource "meshnodes" in API group "meshcrypt.io" at the cluster scope`)),
			`not allowed: user "auditor" may not list meshnodes.meshcrypt.io (cluster-wide). It needs an RBAC rule with apiGroups ["meshcrypt.io"], resources ["meshnodes"], verbs ["list"] in a ClusterRole bound with a ClusterRoleBinding`,
		},
		{
			"forbidden in a namespace, core group",
			forbidden(schema.GroupResource{Resource: "pods"},
				`User "dev" cannot get resource "pods" in API group "" in the namespace "db"`),
			`not allowed: user "dev" may not get pods (in namespace "db"). It needs an RBAC rule with apiGroups [""], resources ["pods"], verbs ["get"] in a Role in namespace "db", or a ClusterRole, bound to the user`,
		},
		{
			"forbidden on a subresource, with the authorizer's reason",
			forbidden(schema.GroupResource{Group: "meshcrypt.io", Resource: "meshnodes"},
				`User "x" cannot patch resource "meshnodes/status" in API group "meshcrypt.io" at the cluster scope: RBAC: role not found`),
			`not allowed: user "x" may not patch meshnodes.meshcrypt.io/status (cluster-wide). It needs an RBAC rule with apiGroups ["meshcrypt.io"], resources ["meshnodes/status"], verbs ["patch"] in a ClusterRole bound with a ClusterRoleBinding`,
		},
		{
			"forbidden by admission is shown as it is",
			fmt.Errorf("set MeshConfig: %w", forbidden(schema.GroupResource{Group: "meshcrypt.io", Resource: "meshconfigs"},
				`ValidatingAdmissionPolicy 'p' with binding 'b' denied request: no`)),
			`set MeshConfig: meshconfigs.meshcrypt.io is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: no`,
		},
		{
			"unauthorized",
			fmt.Errorf("get MeshConfig: %w", apierrors.NewUnauthorized("Unauthorized")),
			"the API server rejected the credentials (401 Unauthorized): the token or client certificate of the kubeconfig's user is wrong or has expired; log in again or pick another --context",
		},
		{
			"connection refused, deep in a chain",
			fmt.Errorf("get MeshConfig: %w", fmt.Errorf("failed to get server groups: %w", refused)),
			"cannot reach the Kubernetes API server at https://10.0.0.1:6443: connection refused (is the cluster up, and is this the right kubeconfig and --context?)",
		},
		{
			"unknown host",
			&url.Error{Op: "Get", URL: "https://k8s.example.invalid:6443/api", Err: &apiServerError{server: "https://k8s.example.invalid:6443",
				err: &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: "k8s.example.invalid", IsNotFound: true}}}},
			"cannot reach the Kubernetes API server at https://k8s.example.invalid:6443: cannot resolve k8s.example.invalid: no such host (is the cluster up, and is this the right kubeconfig and --context?)",
		},
		{
			"timeout",
			apiServer(&net.OpError{Op: "dial", Net: "tcp", Err: timeoutError{}}),
			"cannot reach the Kubernetes API server at https://10.0.0.1:6443: timed out (is the cluster up, and is this the right kubeconfig and --context?)",
		},
		{
			"untrusted certificate",
			apiServer(fmt.Errorf("tls: failed to verify certificate: %w", x509.UnknownAuthorityError{})),
			"cannot verify the Kubernetes API server at https://10.0.0.1:6443: its certificate is not signed by the kubeconfig's certificate-authority (tls: failed to verify certificate: x509: certificate signed by unknown authority)",
		},
		{
			"CRDs not installed",
			fmt.Errorf("get MeshConfig: %w", &meta.NoKindMatchError{GroupKind: schema.GroupKind{Group: "meshcrypt.io", Kind: "MeshConfig"}, SearchedVersions: []string{"v1alpha1"}}),
			"the cluster does not serve the meshcrypt.io/v1alpha1 API: the meshcrypt CRDs are not installed (kubectl apply --server-side -f manifests/crds/, or install the Helm chart)",
		},
		{
			"a request to something else than the API server is its own text",
			fmt.Errorf("node1: %w", &url.Error{Op: "Get", URL: "http://10.0.0.7:9963/flows", Err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}}),
			`node1: Get "http://10.0.0.7:9963/flows": dial tcp: connect: connection refused`,
		},
		{"interrupted is not unreachable", fmt.Errorf("list Nodes: %w", apiServer(context.Canceled)), `list Nodes: Get "https://10.0.0.1:6443/api": context canceled`},
		{"anything else is its own text", fmt.Errorf("list Nodes: %w", errors.New("boom")), "list Nodes: boom"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := describe(tt.err); got != tt.want {
				t.Errorf("describe:\n got %s\nwant %s", got, tt.want)
			}
		})
	}
}

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

func TestParseMode(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want v1alpha1.EncryptionMode
		ok   bool
	}{
		{"wireguard", v1alpha1.ModeWireGuard, true},
		{"WireGuard", v1alpha1.ModeWireGuard, true},
		{"ipsec", v1alpha1.ModeIPsec, true},
		{"IPsec", v1alpha1.ModeIPsec, true},
		{"", "", false},
		{"disabled", "", false},
		{"wg", "", false},
	} {
		got, err := parseMode(tt.in)
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("parseMode(%q) = %q, %v; want %q, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestExitCode(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want int
	}{
		{nil, exitOK},
		{errVerdict, exitVerdict},
		{fmt.Errorf("wrapped: %w", errVerdict), exitVerdict},
		{errors.New("boom"), exitError},
	} {
		if got := exitCode(tt.err); got != tt.want {
			t.Errorf("exitCode(%v) = %d, want %d", tt.err, got, tt.want)
		}
	}
}
