// Command virtblk-hook is virtblk's KubeVirt hook sidecar.
//
//	virtblk-hook [--hooks-dir DIR] [--plugin-dir DIR] [--log-level LEVEL]
//	    serve the hook gRPC API until Shutdown or SIGTERM
//	virtblk-hook render --domain in.xml --vmi vmi.json
//	    print the rewritten domain XML
//	onDefineDomain --vmi <json> --domain <xml>
//	    the sidecar-shim contract: when installed under that name, the
//	    arguments are the JSON and XML themselves and the XML goes to stdout
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/virtblk/virtblk/sidecar"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

func main() {
	os.Exit(run(os.Args, os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if filepath.Base(args[0]) == "onDefineDomain" {
		return shim(args[1:], stdout, stderr)
	}
	if len(args) > 1 {
		switch args[1] {
		case "render":
			return render(args[2:], stdin, stdout, stderr)
		case "help":
			fmt.Fprint(stdout, usage)
			return exitOK
		}
		if !strings.HasPrefix(args[1], "-") {
			fmt.Fprintf(stderr, "virtblk-hook: unknown command %q\n\n%s", args[1], usage)
			return exitUsage
		}
	}
	return serve(args[1:], stderr)
}

const usage = `Usage:
  virtblk-hook [--hooks-dir DIR] [--plugin-dir DIR] [--log-level LEVEL]
               [--compute-hooks-dir DIR] [--store-default FILE]
               [--store-size SIZE] [--qemu-group GID]
      Run the KubeVirt hook sidecar: serve Info, OnDefineDomain (v1alpha1,
      v1alpha2, v1alpha3), Shutdown and the Plugin API's MutateDomain until
      virt-launcher sends Shutdown or the process gets SIGTERM.
  virtblk-hook render --domain FILE --vmi FILE [--log-level LEVEL]
      Print the domain XML the sidecar would return for this domain XML and
      VMI JSON ("-" reads one of them from stdin).
  onDefineDomain --vmi JSON --domain XML
      The same, under the name KubeVirt's sidecar-shim runs, with the JSON and
      XML given as the argument values.

Annotations and protocol: docs/sidecar.md; serving disks from the store
(virtblk.io/serve): docs/serve.md.
`

func serve(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("virtblk-hook", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage, "\nFlags:\n"); fs.PrintDefaults() }
	hooksDir := fs.String("hooks-dir", sidecar.DefaultHooksDir, "directory for the hook socket (virtblk-<random>.sock); empty disables it")
	pluginDir := fs.String("plugin-dir", sidecar.DefaultPluginDir, "directory for the Plugin API socket ("+sidecar.PluginSocketName+"); empty disables it")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	sf := addServeFlags(fs)
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	log, err := newLogger(*level, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "virtblk-hook: %v\n", err)
		return exitUsage
	}
	hooks, serveHook, err := sf.hooks(*hooksDir, log)
	if err != nil {
		fmt.Fprintf(stderr, "virtblk-hook: %v\n", err)
		return exitUsage
	}
	if serveHook != nil {
		// A sidecar restarted after a crash gets no new define call:
		// bring back what it served so QEMU's reconnect finds it.
		if err := serveHook.Restore(); err != nil {
			log.Error("restore served disks", "error", err.Error())
		}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	srv, err := sidecar.New(sidecar.Options{
		Hooks: hooks,
		// A directory left at its default may not exist in this kind of
		// deployment (no plugin volume in a hook sidecar, and the other way
		// round); one the user named must work.
		HooksDir:  sidecar.SocketDir{Path: *hooksDir, Optional: !set["hooks-dir"]},
		PluginDir: sidecar.SocketDir{Path: *pluginDir, Optional: !set["plugin-dir"]},
		Logger:    log,
	})
	if err != nil {
		fmt.Fprintf(stderr, "virtblk-hook: %v\n", err)
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer stop()
	if err := srv.Run(ctx); err != nil {
		log.Error("sidecar failed", "error", err.Error())
		return exitError
	}
	return exitOK
}

func render(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("virtblk-hook render", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage, "\nFlags:\n"); fs.PrintDefaults() }
	domainPath := fs.String("domain", "", "domain XML file as virt-launcher sends it (\"-\" for stdin)")
	vmiPath := fs.String("vmi", "", "VirtualMachineInstance JSON file (\"-\" for stdin)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if *domainPath == "" || *vmiPath == "" {
		fmt.Fprint(stderr, "virtblk-hook render: both --domain FILE and --vmi FILE are required\n")
		return exitUsage
	}
	if *domainPath == "-" && *vmiPath == "-" {
		fmt.Fprint(stderr, "virtblk-hook render: only one of --domain and --vmi can read stdin\n")
		return exitUsage
	}
	domainXML, err := readInput(*domainPath, stdin)
	if err != nil {
		fmt.Fprintf(stderr, "virtblk-hook render: read domain XML: %v\n", err)
		return exitError
	}
	vmiJSON, err := readInput(*vmiPath, stdin)
	if err != nil {
		fmt.Fprintf(stderr, "virtblk-hook render: read VMI JSON: %v\n", err)
		return exitError
	}
	return define("render", *level, domainXML, vmiJSON, stdout, stderr)
}

// shim implements the sidecar-shim's executable contract: argv is
// `--vmi <json> --domain <xml>` and stdout becomes the domain XML verbatim.
func shim(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("onDefineDomain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	vmi := fs.String("vmi", "", "VirtualMachineInstance JSON (the value itself)")
	domain := fs.String("domain", "", "domain XML (the value itself)")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if *vmi == "" || *domain == "" {
		fmt.Fprint(stderr, "onDefineDomain: usage: onDefineDomain --vmi <VMI JSON> --domain <domain XML>\n")
		return exitUsage
	}
	return define("shim", "info", []byte(*domain), []byte(*vmi), stdout, stderr)
}

func define(api, level string, domainXML, vmiJSON []byte, stdout, stderr io.Writer) int {
	log, err := newLogger(level, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "virtblk-hook: %v\n", err)
		return exitUsage
	}
	out, err := sidecar.NewHandler(renderHooks(), log).Define(context.Background(), api, "", domainXML, vmiJSON)
	if err != nil {
		// The handler already logged it; say it plainly too, for a human
		// at a terminal and for the shim's relayed stderr.
		fmt.Fprintf(stderr, "virtblk-hook: %v\n", err)
		return exitError
	}
	if _, err := stdout.Write(out); err != nil {
		fmt.Fprintf(stderr, "virtblk-hook: write output: %v\n", err)
		return exitError
	}
	return exitOK
}

// parseFlags parses and rejects stray arguments. ok is false when the
// caller should return code.
func parseFlags(fs *flag.FlagSet, args []string) (code int, ok bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK, false
		}
		return exitUsage, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return exitUsage, false
	}
	return 0, true
}

func readInput(path string, stdin io.Reader) ([]byte, error) {
	if path == "-" {
		return io.ReadAll(stdin)
	}
	return os.ReadFile(path)
}

func newLogger(level string, w io.Writer) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: use debug, info, warn or error", level)
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l})), nil
}
