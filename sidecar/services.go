package sidecar

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/virtblk/virtblk/sidecar/hookapi/info"
	pluginsv1alpha1 "github.com/virtblk/virtblk/sidecar/hookapi/plugins/v1alpha1"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha1"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha2"
	"github.com/virtblk/virtblk/sidecar/hookapi/v1alpha3"
)

// Names virtblk announces in Info.
const (
	HookName           = "virtblk"
	HookOnDefineDomain = "OnDefineDomain"
	HookShutdown       = "Shutdown"
)

// Versions are the Callbacks versions virtblk serves; virt-launcher picks
// the newest it knows.
var Versions = []string{"v1alpha1", "v1alpha2", "v1alpha3"}

// grpcError turns a pipeline error into a status whose message is the whole
// error text: virt-launcher logs it and puts it in the VMI's SyncFailed
// event, so it is what the user sees.
func grpcError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return status.FromContextError(err).Err()
	}
	var in *InvalidInputError
	if errors.As(err, &in) {
		return status.Error(codes.InvalidArgument, "virtblk: "+err.Error())
	}
	return status.Error(codes.Internal, "virtblk: "+err.Error())
}

type infoService struct {
	info.UnimplementedInfoServer
}

func (infoService) Info(context.Context, *info.InfoParams) (*info.InfoResult, error) {
	return &info.InfoResult{
		Name: HookName,
		HookPoints: []*info.HookPoint{
			{Name: HookOnDefineDomain},
			{Name: HookShutdown},
		},
		Versions: append([]string(nil), Versions...),
	}, nil
}

type v1alpha1Service struct {
	v1alpha1.UnimplementedCallbacksServer
	h *Handler
}

func (s v1alpha1Service) OnDefineDomain(ctx context.Context, p *v1alpha1.OnDefineDomainParams) (*v1alpha1.OnDefineDomainResult, error) {
	out, err := s.h.Define(ctx, "v1alpha1", "", p.GetDomainXML(), p.GetVmi())
	if err != nil {
		return nil, grpcError(err)
	}
	return &v1alpha1.OnDefineDomainResult{DomainXML: out}, nil
}

type v1alpha2Service struct {
	v1alpha2.UnimplementedCallbacksServer
	h *Handler
}

func (s v1alpha2Service) OnDefineDomain(ctx context.Context, p *v1alpha2.OnDefineDomainParams) (*v1alpha2.OnDefineDomainResult, error) {
	out, err := s.h.Define(ctx, "v1alpha2", "", p.GetDomainXML(), p.GetVmi())
	if err != nil {
		return nil, grpcError(err)
	}
	return &v1alpha2.OnDefineDomainResult{DomainXML: out}, nil
}

// PreCloudInitIso is not subscribed to in Info, so virt-launcher never
// calls it; if something does, the cloud-init data passes through.
func (s v1alpha2Service) PreCloudInitIso(_ context.Context, p *v1alpha2.PreCloudInitIsoParams) (*v1alpha2.PreCloudInitIsoResult, error) {
	return &v1alpha2.PreCloudInitIsoResult{
		CloudInitNoCloudSource: p.GetCloudInitNoCloudSource(),
		CloudInitData:          p.GetCloudInitData(),
	}, nil
}

type v1alpha3Service struct {
	v1alpha3.UnimplementedCallbacksServer
	h *Handler
	// shutdown asks the server to stop; it returns at once.
	shutdown func()
}

func (s v1alpha3Service) OnDefineDomain(ctx context.Context, p *v1alpha3.OnDefineDomainParams) (*v1alpha3.OnDefineDomainResult, error) {
	out, err := s.h.Define(ctx, "v1alpha3", "", p.GetDomainXML(), p.GetVmi())
	if err != nil {
		return nil, grpcError(err)
	}
	return &v1alpha3.OnDefineDomainResult{DomainXML: out}, nil
}

// PreCloudInitIso: see v1alpha2Service.PreCloudInitIso.
func (s v1alpha3Service) PreCloudInitIso(_ context.Context, p *v1alpha3.PreCloudInitIsoParams) (*v1alpha3.PreCloudInitIsoResult, error) {
	return &v1alpha3.PreCloudInitIsoResult{
		CloudInitNoCloudSource: p.GetCloudInitNoCloudSource(),
		CloudInitData:          p.GetCloudInitData(),
	}, nil
}

// Shutdown replies first and stops afterwards: the server's graceful stop
// waits for this reply to be sent.
func (s v1alpha3Service) Shutdown(context.Context, *v1alpha3.ShutdownParams) (*v1alpha3.ShutdownResult, error) {
	s.shutdown()
	return &v1alpha3.ShutdownResult{}, nil
}

type domainHookService struct {
	pluginsv1alpha1.UnimplementedDomainHookServiceServer
	h *Handler
}

func (s domainHookService) MutateDomain(ctx context.Context, r *pluginsv1alpha1.MutateDomainRequest) (*pluginsv1alpha1.MutateDomainResponse, error) {
	if t := r.GetDomainType(); t != "" && t != "libvirt" {
		return nil, status.Errorf(codes.InvalidArgument, "virtblk: domain_type %q is not supported; virtblk rewrites libvirt domains only", t)
	}
	out, err := s.h.Define(ctx, "plugin", r.GetSidecarContext().GetInvocationContext(), r.GetDomain(), r.GetVmi())
	if err != nil {
		return nil, grpcError(err)
	}
	return &pluginsv1alpha1.MutateDomainResponse{Domain: out}, nil
}
