package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// AdminUser is the name of the built-in admin user, a member of system:masters. Its token is
// AdminToken(); Token(AdminUser) returns it too.
const AdminUser = "meshcrypt-admin"

// DirPrefix starts the name of every control plane's temporary directory; CleanupStale looks
// for it.
const DirPrefix = "meshcrypt-cp-"

// ServiceAccountIssuer is the issuer (and default audience) of service-account tokens.
const ServiceAccountIssuer = "https://kubernetes.default.svc.cluster.local"

// ServiceClusterIPRange is the API server's --service-cluster-ip-range.
const ServiceClusterIPRange = "10.96.0.0/12"

// KubernetesServiceIP is the cluster IP of the "kubernetes" Service: the first address of
// ServiceClusterIPRange.
var KubernetesServiceIP = netip.MustParseAddr("10.96.0.1")

// Timeouts and retries; each wait is also bounded by the caller's context.
const (
	etcdStartTimeout = time.Minute
	apiStartTimeout  = 2 * time.Minute
	pollInterval     = 100 * time.Millisecond
	startAttempts    = 3
)

// User is a user the API server authenticates by a static bearer token. It starts with no
// permissions beyond what RBAC grants every authenticated user.
type User struct {
	// Name is the user name (also its UID). It must not contain a comma, quote or newline.
	Name string
	// Groups are the groups the user belongs to, besides system:authenticated.
	Groups []string
}

// Options configures Start. The zero value is valid.
type Options struct {
	// Dir is the parent of the control plane's temporary directory; "" means os.TempDir().
	Dir string
	// KubeAPIServer is the kube-apiserver binary. "" means $MESHCRYPT_KUBE_APISERVER, else the
	// path printed by hack/kube-apiserver.sh of the module enclosing the working directory.
	KubeAPIServer string
	// Users get a random token each, returned by ControlPlane.Token.
	Users []User
	// APIServerArgs are appended to kube-apiserver's command line. A repeated scalar flag
	// overrides the default; a repeated list flag (e.g. --disable-admission-plugins) adds to it.
	APIServerArgs []string
	// Logger receives progress messages; nil discards them.
	Logger *slog.Logger
	// Address is the IP the API server binds to and advertises (the endpoint of the
	// "kubernetes" Service); it joins the serving certificate's addresses. The zero value means
	// 127.0.0.1.
	Address netip.Addr
	// Kubelets configures the API server for a cluster with real kubelets and a controller
	// manager (tests/k8s): the ServiceAccount admission plugin on, the Node authorizer before
	// RBAC, the default endpoint reconciler publishing Address, kubelets reached by their
	// InternalIP, and the first address of ServiceClusterIPRange (the in-cluster address of the
	// "kubernetes" Service) in the serving certificate.
	Kubelets bool
}

// ControlPlane is a running etcd and kube-apiserver on loopback. Its methods are safe for
// concurrent use.
type ControlPlane struct {
	log        *slog.Logger
	dir        string
	etcdBin    string
	apiBin     string
	extraArgs  []string
	addr       netip.Addr
	kubelets   bool
	users      []User
	caPEM      []byte
	adminToken string
	tokens     map[string]string // user name -> token, including AdminUser

	// Ports are chosen while Start runs and never change afterwards.
	etcdClientPort int
	etcdPeerPort   int
	apiPort        int

	mu      sync.Mutex
	etcd    *process
	api     *process
	stopped bool
}

// Start creates a temporary directory, generates certificates and tokens, starts etcd and
// kube-apiserver on free loopback ports and waits until the API server is ready and the default
// namespace exists. ctx bounds the start only (including a first build of kube-apiserver); the
// processes run until Stop. On error nothing is left running and the directory is removed; the
// error carries the tail of the failing process's log.
func Start(ctx context.Context, opts Options) (*ControlPlane, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	tokens := map[string]string{AdminUser: randomToken()}
	for _, u := range opts.Users {
		if err := validUserName(u.Name); err != nil {
			return nil, fmt.Errorf("start control plane: %w", err)
		}
		if _, dup := tokens[u.Name]; dup {
			return nil, fmt.Errorf("start control plane: user %q given twice or reserved", u.Name)
		}
		tokens[u.Name] = randomToken()
	}
	etcdBin, err := findEtcd()
	if err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	apiBin, err := findKubeAPIServer(ctx, opts.KubeAPIServer, log)
	if err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	parent := opts.Dir
	if parent == "" {
		parent = os.TempDir()
	}
	dir, err := os.MkdirTemp(parent, DirPrefix)
	if err != nil {
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	cp := &ControlPlane{
		log:        log.With("dir", dir),
		dir:        dir,
		etcdBin:    etcdBin,
		apiBin:     apiBin,
		extraArgs:  append([]string(nil), opts.APIServerArgs...),
		addr:       opts.Address,
		kubelets:   opts.Kubelets,
		users:      append([]User{{Name: AdminUser, Groups: []string{"system:masters"}}}, opts.Users...),
		adminToken: tokens[AdminUser],
		tokens:     tokens,
	}
	if err := cp.init(ctx); err != nil {
		if stopErr := cp.Stop(); stopErr != nil {
			err = errors.Join(err, stopErr)
		}
		return nil, fmt.Errorf("start control plane: %w", err)
	}
	return cp, nil
}

// StartT starts a control plane for a test and stops it in t.Cleanup. It fails the test if the
// control plane does not start. First it removes what killed test binaries left behind
// (CleanupStale).
func StartT(t testing.TB, opts Options) *ControlPlane {
	t.Helper()
	if err := CleanupStale(opts.Dir); err != nil {
		t.Logf("cleanup stale control planes: %v", err)
	}
	cp, err := Start(t.Context(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cp.Stop(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	return cp
}

func (cp *ControlPlane) init(ctx context.Context) error {
	if err := writeOwner(cp.dir); err != nil {
		return err
	}
	var sans []net.IP
	if cp.addr.IsValid() {
		sans = append(sans, cp.addr.AsSlice())
	}
	if cp.kubelets {
		sans = append(sans, KubernetesServiceIP.AsSlice())
	}
	ca, err := writeCerts(cp.dir, sans...)
	if err != nil {
		return err
	}
	cp.caPEM = ca
	if err := writeTokenFile(cp.path(tokenFile), cp.users, cp.tokens); err != nil {
		return err
	}
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if err := cp.startEtcdLocked(ctx, true); err != nil {
		return err
	}
	if err := cp.startAPIServerLocked(ctx, true); err != nil {
		return err
	}
	return cp.waitDefaultNamespace(ctx)
}

func (cp *ControlPlane) path(name string) string { return filepath.Join(cp.dir, name) }

// Dir returns the control plane's temporary directory. Stop removes it.
func (cp *ControlPlane) Dir() string { return cp.dir }

// URL returns the API server's URL, https://ADDRESS:PORT (Options.Address, 127.0.0.1 by
// default). It does not change on restarts.
func (cp *ControlPlane) URL() string {
	return "https://" + net.JoinHostPort(cp.address().String(), strconv.Itoa(cp.apiPort))
}

// address is the API server's bind and advertise address.
func (cp *ControlPlane) address() netip.Addr {
	if cp.addr.IsValid() {
		return cp.addr
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
}

// Port returns the API server's port. It does not change on restarts.
func (cp *ControlPlane) Port() int { return cp.apiPort }

// EtcdURL returns etcd's client URL, http://127.0.0.1:PORT.
func (cp *ControlPlane) EtcdURL() string {
	return "http://127.0.0.1:" + strconv.Itoa(cp.etcdClientPort)
}

// CACert returns (a copy of) the PEM certificate of the CA that signed the API server's
// serving certificate.
func (cp *ControlPlane) CACert() []byte { return append([]byte(nil), cp.caPEM...) }

// AdminToken returns the bearer token of AdminUser, a member of system:masters.
func (cp *ControlPlane) AdminToken() string { return cp.adminToken }

// Token returns the bearer token of a user given in Options.Users (or AdminUser), "" for an
// unknown user.
func (cp *ControlPlane) Token(user string) string { return cp.tokens[user] }

// EtcdLog returns the path of etcd's log file (all runs, appended).
func (cp *ControlPlane) EtcdLog() string { return cp.path(etcdLogFile) }

// APIServerLog returns the path of kube-apiserver's log file (all runs, appended).
func (cp *ControlPlane) APIServerLog() string { return cp.path(apiLogFile) }

// RESTConfig returns a new client configuration for the API server with the admin token.
func (cp *ControlPlane) RESTConfig() *rest.Config { return cp.RESTConfigFor(cp.adminToken) }

// RESTConfigFor returns a new client configuration for the API server authenticating with a
// bearer token: a user's, or a service account's from the TokenRequest API. Its rate limits are
// raised for tests (QPS 50, burst 100).
func (cp *ControlPlane) RESTConfigFor(token string) *rest.Config {
	return &rest.Config{
		Host:            cp.URL(),
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: cp.CACert()},
		QPS:             50,
		Burst:           100,
	}
}

// Stop stops kube-apiserver and etcd (SIGTERM to each process group, SIGKILL after 10 s), waits
// for them and removes the directory. It is idempotent and safe on a partially started plane.
func (cp *ControlPlane) Stop() error {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.stopped {
		return nil
	}
	cp.stopped = true
	if cp.api != nil {
		cp.api.stop(stopGrace)
	}
	if cp.etcd != nil {
		cp.etcd.stop(stopGrace)
	}
	cp.log.Info("control plane stopped")
	if err := os.RemoveAll(cp.dir); err != nil {
		return fmt.Errorf("stop control plane: %w", err)
	}
	return nil
}

// StopAPIServer stops kube-apiserver and waits for it to exit; etcd keeps running. It is
// idempotent.
func (cp *ControlPlane) StopAPIServer() error {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.stopped {
		return errors.New("stop kube-apiserver: control plane stopped")
	}
	if cp.api != nil {
		cp.api.stop(stopGrace)
	}
	return nil
}

// StartAPIServer starts kube-apiserver again after StopAPIServer, on the same port with the same
// certificates and tokens, and waits until it is ready. It does nothing if it is running.
func (cp *ControlPlane) StartAPIServer(ctx context.Context) error {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.stopped {
		return errors.New("start kube-apiserver: control plane stopped")
	}
	if cp.api != nil && !cp.api.exited() {
		return nil
	}
	return cp.startAPIServerLocked(ctx, false)
}

// StopEtcd stops etcd and waits for it to exit; kube-apiserver keeps running (and fails its
// requests). It is idempotent.
func (cp *ControlPlane) StopEtcd() error {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.stopped {
		return errors.New("stop etcd: control plane stopped")
	}
	if cp.etcd != nil {
		cp.etcd.stop(stopGrace)
	}
	return nil
}

// StartEtcd starts etcd again after StopEtcd, with the same data directory and ports, and waits
// until it is healthy and, if kube-apiserver runs, until that is ready again. It does nothing
// if etcd is running.
func (cp *ControlPlane) StartEtcd(ctx context.Context) error {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.stopped {
		return errors.New("start etcd: control plane stopped")
	}
	if cp.etcd != nil && !cp.etcd.exited() {
		return nil
	}
	if err := cp.startEtcdLocked(ctx, false); err != nil {
		return err
	}
	if cp.api != nil && !cp.api.exited() {
		return cp.waitAPIServer(ctx, cp.api)
	}
	return nil
}

// RestartEtcd stops etcd and starts it again with the same data directory and ports (StopEtcd,
// then StartEtcd).
func (cp *ControlPlane) RestartEtcd(ctx context.Context) error {
	if err := cp.StopEtcd(); err != nil {
		return err
	}
	return cp.StartEtcd(ctx)
}

// pids returns the pids of the processes started last (0 for none).
func (cp *ControlPlane) pids() (etcd, api int) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.etcd != nil {
		etcd = cp.etcd.pid()
	}
	if cp.api != nil {
		api = cp.api.pid()
	}
	return etcd, api
}

func (cp *ControlPlane) etcdArgs() []string {
	peer := "http://127.0.0.1:" + strconv.Itoa(cp.etcdPeerPort)
	client := cp.EtcdURL()
	return []string{
		"--name=meshcrypt",
		"--data-dir=" + cp.path(etcdDataDir),
		"--listen-client-urls=" + client,
		"--advertise-client-urls=" + client,
		"--listen-peer-urls=" + peer,
		"--initial-advertise-peer-urls=" + peer,
		"--initial-cluster=meshcrypt=" + peer,
		"--initial-cluster-state=new",
		"--initial-cluster-token=" + filepath.Base(cp.dir),
		"--logger=zap",
		"--log-outputs=stderr",
	}
}

func (cp *ControlPlane) apiServerArgs() []string {
	addr := cp.address().String()
	args := []string{
		"--etcd-servers=" + cp.EtcdURL(),
		"--bind-address=" + addr,
		"--advertise-address=" + addr,
		"--secure-port=" + strconv.Itoa(cp.apiPort),
		"--tls-cert-file=" + cp.path(servingCert),
		"--tls-private-key-file=" + cp.path(servingKey),
		// Only used for certificates the server would generate itself; keeps it out of
		// /var/run/kubernetes.
		"--cert-dir=" + cp.path(apiCertDir),
		"--token-auth-file=" + cp.path(tokenFile),
		"--service-account-issuer=" + ServiceAccountIssuer,
		"--service-account-key-file=" + cp.path(saPubFile),
		"--service-account-signing-key-file=" + cp.path(saKeyFile),
		"--service-cluster-ip-range=" + ServiceClusterIPRange,
		"--allow-privileged=true",
		"--profiling=false",
	}
	if cp.kubelets {
		args = append(args,
			"--authorization-mode=Node,RBAC",
			// Also what the API server publishes in kube-system/extension-apiserver-
			// authentication, which the controller manager and scheduler wait for.
			"--client-ca-file="+cp.path(caCertFile),
			// exec, logs and port-forward reach the kubelet at its node IP, not by a name
			// that no DNS here resolves.
			"--kubelet-preferred-address-types=InternalIP",
		)
	} else {
		args = append(args,
			"--authorization-mode=RBAC",
			// No controller manager creates default ServiceAccounts; with this plugin every
			// Pod would need one.
			"--disable-admission-plugins=ServiceAccount",
			// The default reconciler publishes the advertise address as the endpoint of the
			// "kubernetes" Service and fails, loudly, because 127.0.0.1 is loopback; nothing
			// here routes Service IPs anyway.
			"--endpoint-reconciler-type=none",
		)
	}
	return append(args, cp.extraArgs...)
}

// startEtcdLocked starts etcd and waits until it is healthy. With newPorts it picks fresh ports
// (and a fresh data directory) on every attempt; otherwise it reuses the ports and data and
// retries a taken port after a pause.
func (cp *ControlPlane) startEtcdLocked(ctx context.Context, newPorts bool) error {
	for attempt := 1; ; attempt++ {
		if newPorts {
			var err error
			if cp.etcdClientPort, err = freePort(); err != nil {
				return fmt.Errorf("start etcd: %w", err)
			}
			if cp.etcdPeerPort, err = freePort(); err != nil {
				return fmt.Errorf("start etcd: %w", err)
			}
			if err := os.RemoveAll(cp.path(etcdDataDir)); err != nil {
				return fmt.Errorf("start etcd: %w", err)
			}
		}
		if err := os.MkdirAll(cp.path(etcdDataDir), 0o700); err != nil {
			return fmt.Errorf("start etcd: %w", err)
		}
		p, err := startProcess("etcd", cp.etcdBin, cp.etcdArgs(), cp.path(etcdLogFile))
		if err != nil {
			return err
		}
		cp.etcd = p
		cp.log.Info("etcd started", "pid", p.pid(), "port", cp.etcdClientPort, "attempt", attempt)
		err = cp.waitEtcd(ctx, p)
		if err == nil {
			return nil
		}
		p.stop(stopGrace)
		if !errors.Is(err, errAddrInUse) || attempt == startAttempts {
			return err
		}
		cp.log.Warn("etcd port taken, retrying", "error", err)
		if !newPorts {
			if err := sleepCtx(ctx, time.Second); err != nil {
				return fmt.Errorf("start etcd: %w", err)
			}
		}
	}
}

// startAPIServerLocked is startEtcdLocked for kube-apiserver.
func (cp *ControlPlane) startAPIServerLocked(ctx context.Context, newPort bool) error {
	for attempt := 1; ; attempt++ {
		if newPort {
			var err error
			if cp.apiPort, err = freePort(); err != nil {
				return fmt.Errorf("start kube-apiserver: %w", err)
			}
		}
		p, err := startProcess("kube-apiserver", cp.apiBin, cp.apiServerArgs(), cp.path(apiLogFile))
		if err != nil {
			return err
		}
		cp.api = p
		cp.log.Info("kube-apiserver started", "pid", p.pid(), "port", cp.apiPort, "attempt", attempt)
		err = cp.waitAPIServer(ctx, p)
		if err == nil {
			cp.log.Info("kube-apiserver ready", "url", cp.URL())
			return nil
		}
		p.stop(stopGrace)
		if !errors.Is(err, errAddrInUse) || attempt == startAttempts {
			return err
		}
		cp.log.Warn("kube-apiserver port taken, retrying", "error", err)
		if !newPort {
			if err := sleepCtx(ctx, time.Second); err != nil {
				return fmt.Errorf("start kube-apiserver: %w", err)
			}
		}
	}
}

// waitEtcd polls etcd's /health until it reports healthy, the process exits or time runs out.
func (cp *ControlPlane) waitEtcd(ctx context.Context, p *process) error {
	ctx, cancel := context.WithTimeout(ctx, etcdStartTimeout)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	var last string
	for {
		if p.exited() {
			err := p.exitError()
			if p.addrInUse() {
				err = fmt.Errorf("%w: %w", errAddrInUse, err)
			}
			return fmt.Errorf("start etcd: %w", err)
		}
		code, body, err := get(ctx, client, cp.EtcdURL()+"/health", "")
		switch {
		case err != nil:
			last = err.Error()
		case code == http.StatusOK && strings.Contains(body, `"true"`):
			return nil
		default:
			last = fmt.Sprintf("HTTP %d: %s", code, body)
		}
		if err := sleepCtx(ctx, pollInterval); err != nil {
			return fmt.Errorf("start etcd: not healthy (%s): %w; last log lines:\n%s",
				last, err, tail(p.output(), 40))
		}
	}
}

// waitAPIServer polls the API server's /readyz with the admin token until it answers ok, the
// process exits or time runs out.
func (cp *ControlPlane) waitAPIServer(ctx context.Context, p *process) error {
	ctx, cancel := context.WithTimeout(ctx, apiStartTimeout)
	defer cancel()
	client := cp.httpClient()
	var last string
	for {
		if p.exited() {
			err := p.exitError()
			if p.addrInUse() {
				err = fmt.Errorf("%w: %w", errAddrInUse, err)
			}
			return fmt.Errorf("start kube-apiserver: %w", err)
		}
		code, body, err := get(ctx, client, cp.URL()+"/readyz", cp.adminToken)
		switch {
		case err != nil:
			last = err.Error()
		case code == http.StatusOK:
			return nil
		default:
			last = fmt.Sprintf("HTTP %d: %s", code, body)
		}
		if err := sleepCtx(ctx, pollInterval); err != nil {
			return fmt.Errorf("start kube-apiserver: not ready (%s): %w; last log lines:\n%s\netcd's last log lines:\n%s",
				last, err, tail(p.output(), 40), logTail(cp.path(etcdLogFile), 10))
		}
	}
}

// waitDefaultNamespace waits until the API server's bootstrap controller has created the
// default namespace, so callers can create objects there at once.
func (cp *ControlPlane) waitDefaultNamespace(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, apiStartTimeout)
	defer cancel()
	client := cp.httpClient()
	for {
		code, body, err := get(ctx, client, cp.URL()+"/api/v1/namespaces/default", cp.adminToken)
		if err == nil && code == http.StatusOK {
			return nil
		}
		if err := sleepCtx(ctx, pollInterval); err != nil {
			return fmt.Errorf("wait for namespace default (HTTP %d %s): %w", code, body, err)
		}
	}
}

// httpClient returns an HTTP client that trusts the control plane's CA.
func (cp *ControlPlane) httpClient() *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cp.caPEM)
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			DisableKeepAlives: true,
		},
	}
}

// get performs a GET and returns the status code and (at most 4 KiB of) the body.
func get(ctx context.Context, client *http.Client, url, token string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
