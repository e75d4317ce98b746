// A tiny synchronous C++ gRPC client for Osprey's Open Inference Protocol service, used to
// measure the server's own overhead at concurrency 1. The Python clients cost too much beside
// the server: grpc.aio (benchmarks/grpc_driver.py) about as long per call as the server takes,
// and even the sync grpc client about 240 us of CPU a call; this client about 90-120 us
// (reported as client_cpu_us_per_call: user + system CPU of all its threads over the timed calls).
//
// One channel, one stub; W warm-up calls (the first is a check), then N sequential calls, each
// timed with std::chrono::steady_clock. Every call's status is checked: a failed first call
// prints the error and exits 1; later failures are counted (and not timed). Prints one line:
//   {"api": ..., "target": ..., "requests": N, "errors": E,
//    "latency_ms": {"p50": .., "p90": .., "p99": .., "mean": .., "max": ..},
//    "throughput_rps": .., "client_cpu_us_per_call": ..}
// Percentiles are nearest-rank, as in benchmarks/openloop.py. ModelInfer sends one input in
// raw_input_contents: uniform random values for FP32, zeros for other datatypes.
//
//   grpc_c1 --target 127.0.0.1:7070 --api live --requests 3000 --warmup 200
//   grpc_c1 --target 127.0.0.1:7070 --api infer --model mlp --input INPUT0:FP32:1,16 --requests 3000
//
// With --concurrency C (> 1) it is a closed-loop load driver instead: C threads, each sending a call
// and waiting for its answer, spread over --channels K channels (each its own HTTP/2 connection),
// for --duration S seconds after --warmup W calls per thread; same JSON line, latency over all
// threads (the Python driver at c=32 spends more CPU than the server it loads, on 2 cores):
//   grpc_c1 --target 127.0.0.1:7070 --api infer --model mlp --concurrency 32 --channels 2 --duration 5
//
// `grpc_c1 --serve 127.0.0.1:0` is instead a minimal C++ server of the same service (ServerLive,
// and ModelInfer echoing its inputs); it prints {"serving": ..., "port": P} and runs until
// killed. The client against it gives the floor (client + transport + the least a server can
// do), to set beside the same client against Osprey.
//
// Built by benchmarks/grpc_c1.py (protoc + grpc_cpp_plugin on protos/grpc_service.proto).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>

#include <grpcpp/grpcpp.h>

#include "grpc_service.grpc.pb.h"

namespace {

struct Args {
  std::string target = "127.0.0.1:7070";
  std::string api = "live";
  std::string model;
  std::string input = "INPUT0:FP32:1,16";
  long requests = 1000;
  long warmup = 100;
  double deadline_s = 30.0;
  long concurrency = 1;   // > 1: closed-loop load from this many threads
  long channels = 1;      // the threads share this many channels (connections), round robin
  double duration_s = 0;  // with --concurrency: seconds of timed calls per thread
  std::string serve;  // --serve host:port: be the floor server instead of a client
};

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr,
               "grpc_c1: %s\nusage: grpc_c1 --target host:port --api live|infer [--model NAME] "
               "[--input NAME:DTYPE:d0,d1,...] [--requests N] [--warmup W] [--deadline S]\n"
               "       [--concurrency C --channels K --duration S]\n"
               "       grpc_c1 --serve host:port   (the floor server: see the file's comment)\n",
               msg);
  std::exit(2);
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (i + 1 >= argc) usage(("missing value after " + k).c_str());
    std::string v = argv[++i];
    if (k == "--target") a.target = v;
    else if (k == "--api") a.api = v;
    else if (k == "--model") a.model = v;
    else if (k == "--input") a.input = v;
    else if (k == "--requests") a.requests = std::strtol(v.c_str(), nullptr, 10);
    else if (k == "--warmup") a.warmup = std::strtol(v.c_str(), nullptr, 10);
    else if (k == "--deadline") a.deadline_s = std::strtod(v.c_str(), nullptr);
    else if (k == "--serve") a.serve = v;
    else if (k == "--concurrency") a.concurrency = std::strtol(v.c_str(), nullptr, 10);
    else if (k == "--channels") a.channels = std::strtol(v.c_str(), nullptr, 10);
    else if (k == "--duration") a.duration_s = std::strtod(v.c_str(), nullptr);
    else usage(("unknown option " + k).c_str());
  }
  if (a.api != "live" && a.api != "infer") usage("--api must be live or infer");
  if (a.api == "infer" && a.model.empty()) usage("--api infer needs --model");
  if (a.requests < 1 || a.warmup < 0) usage("--requests must be >= 1 and --warmup >= 0");
  if (a.concurrency < 1 || a.channels < 1) usage("--concurrency and --channels must be >= 1");
  if (a.concurrency > 1 && a.duration_s <= 0) usage("--concurrency > 1 needs --duration S (seconds, > 0)");
  return a;
}

// Bytes per element of the Open Inference Protocol's fixed-size datatypes.
size_t element_size(const std::string& dt) {
  static const std::map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"UINT8", 1}, {"INT8", 1},   {"UINT16", 2}, {"INT16", 2}, {"FP16", 2}, {"BF16", 2},
      {"UINT32", 4}, {"INT32", 4}, {"FP32", 4}, {"UINT64", 8}, {"INT64", 8}, {"FP64", 8}};
  auto it = sizes.find(dt);
  if (it == sizes.end()) usage(("unsupported datatype " + dt).c_str());
  return it->second;
}

// "INPUT0:FP32:1,16" -> one input tensor and its raw bytes (random uniform for FP32, zeros else).
void add_input(inference::ModelInferRequest* req, const std::string& spec) {
  size_t c1 = spec.find(':'), c2 = spec.find(':', c1 == std::string::npos ? 0 : c1 + 1);
  if (c1 == std::string::npos || c2 == std::string::npos) usage("--input must be NAME:DTYPE:d0,d1,...");
  auto* in = req->add_inputs();
  in->set_name(spec.substr(0, c1));
  std::string dt = spec.substr(c1 + 1, c2 - c1 - 1);
  for (auto& ch : dt) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  in->set_datatype(dt);
  size_t count = 1;
  std::string dims = spec.substr(c2 + 1);
  for (size_t pos = 0; pos <= dims.size();) {
    size_t comma = dims.find(',', pos);
    if (comma == std::string::npos) comma = dims.size();
    long d = std::strtol(dims.substr(pos, comma - pos).c_str(), nullptr, 10);
    if (d < 1) usage("--input shape dimensions must be positive integers");
    in->add_shape(d);
    count *= static_cast<size_t>(d);
    pos = comma + 1;
  }
  std::string raw(count * element_size(dt), '\0');
  if (dt == "FP32") {
    std::mt19937 rng(12345);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (size_t i = 0; i < count; ++i) {
      float f = u(rng);
      std::memcpy(&raw[i * 4], &f, 4);  // little-endian on every host this runs on
    }
  }
  req->add_raw_input_contents(std::move(raw));
}

double cpu_seconds() {  // user + system CPU of this process, all threads
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + 1e-6 * (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

double pct(const std::vector<double>& sorted, double p) {  // nearest rank
  long n = static_cast<long>(sorted.size());
  long k = static_cast<long>(std::ceil(p / 100.0 * n - 1e-9)) - 1;
  k = std::min(n - 1, std::max(0L, k));
  return sorted[static_cast<size_t>(k)];
}

// The floor server: ServerLive answers live=true; ModelInfer echoes each input back as an
// output (same datatype, shape and raw bytes). The client against it measures the client,
// the transport and a C++ server's minimum, to set beside the same client against Osprey.
class FloorService final : public inference::GRPCInferenceService::Service {
  grpc::Status ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                          inference::ServerLiveResponse* resp) override {
    resp->set_live(true);
    return grpc::Status::OK;
  }
  grpc::Status ModelInfer(grpc::ServerContext*, const inference::ModelInferRequest* req,
                          inference::ModelInferResponse* resp) override {
    resp->set_model_name(req->model_name());
    for (int i = 0; i < req->inputs_size(); ++i) {
      auto* out = resp->add_outputs();
      out->set_name("OUTPUT" + std::to_string(i));
      out->set_datatype(req->inputs(i).datatype());
      *out->mutable_shape() = req->inputs(i).shape();
      if (i < req->raw_input_contents_size()) resp->add_raw_output_contents(req->raw_input_contents(i));
    }
    return grpc::Status::OK;
  }
};

int serve(const std::string& address) {
  FloorService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "grpc_c1: cannot listen on %s\n", address.c_str());
    return 1;
  }
  std::printf("{\"serving\": \"%s\", \"port\": %d}\n", address.c_str(), port);
  std::fflush(stdout);
  server->Wait();  // until the process is killed
  return 0;
}

struct Caller {
  const Args& a;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub;
  inference::ServerLiveRequest live_req;
  inference::ModelInferRequest infer_req;

  Caller(const Args& args, const std::shared_ptr<grpc::Channel>& channel)
      : a(args), stub(inference::GRPCInferenceService::NewStub(channel)) {
    if (a.api == "infer") {
      infer_req.set_model_name(a.model);
      add_input(&infer_req, a.input);
    }
  }

  bool call(std::string* error) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::microseconds(static_cast<long>(a.deadline_s * 1e6)));
    grpc::Status st;
    if (a.api == "live") {
      inference::ServerLiveResponse resp;
      st = stub->ServerLive(&ctx, live_req, &resp);
      if (st.ok() && !resp.live()) {
        if (error) *error = "ServerLive answered live=false";
        return false;
      }
    } else {
      inference::ModelInferResponse resp;
      st = stub->ModelInfer(&ctx, infer_req, &resp);
      if (st.ok() && resp.outputs_size() == 0) {
        if (error) *error = "ModelInfer answered no outputs";
        return false;
      }
    }
    if (!st.ok() && error) *error = "status " + std::to_string(st.error_code()) + ": " + st.error_message();
    return st.ok();
  }
};

std::shared_ptr<grpc::Channel> make_channel(const Args& a, int index) {
  grpc::ChannelArguments ch_args;
  ch_args.SetMaxReceiveMessageSize(-1);
  ch_args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);  // no call here is retried; skips the retry filter
  ch_args.SetInt("osprey.channel_index", index);  // distinct args: a connection of its own per channel
  ch_args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(a.target, grpc::InsecureChannelCredentials(), ch_args);
}

}  // namespace

int main(int argc, char** argv) {
  Args a = parse_args(argc, argv);
  if (!a.serve.empty()) return serve(a.serve);
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (long i = 0; i < std::min(a.channels, a.concurrency); ++i) channels.push_back(make_channel(a, static_cast<int>(i)));
  std::vector<std::unique_ptr<Caller>> callers;
  for (long t = 0; t < a.concurrency; ++t)
    callers.push_back(std::make_unique<Caller>(a, channels[static_cast<size_t>(t) % channels.size()]));

  std::string err;
  for (auto& c : callers) {
    if (!c->call(&err)) {
      std::fprintf(stderr, "grpc_c1: first %s call to %s failed: %s\n", a.api.c_str(), a.target.c_str(),
                   err.c_str());
      return 1;
    }
  }
  long errors = 0;
  std::vector<double> lat;
  double cpu_start = 0, elapsed = 0;
  long calls = 0;
  if (a.concurrency == 1) {
    Caller& c = *callers[0];
    for (long i = 1; i < a.warmup; ++i)
      if (!c.call(nullptr)) ++errors;  // warm-up failures are counted too: they mean a sick server
    lat.reserve(static_cast<size_t>(a.requests));
    cpu_start = cpu_seconds();
    auto t_start = std::chrono::steady_clock::now();
    for (long i = 0; i < a.requests; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      bool ok = c.call(nullptr);
      auto t1 = std::chrono::steady_clock::now();
      if (ok) lat.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      else ++errors;
    }
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    calls = a.requests;
  } else {
    // every thread warms up, then all time calls in the same window [t_start, t_end)
    std::vector<std::vector<double>> per(callers.size());
    std::vector<long> errs(callers.size(), 0);
    std::atomic<long> warmed{0};
    std::chrono::steady_clock::time_point t_start, t_end;
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (size_t t = 0; t < callers.size(); ++t) {
      threads.emplace_back([&, t] {
        Caller& c = *callers[t];
        for (long i = 1; i < a.warmup; ++i)
          if (!c.call(nullptr)) ++errs[t];
        warmed.fetch_add(1);
        while (!go.load(std::memory_order_acquire)) {  // the others still warming: keep the load on
          if (!c.call(nullptr)) ++errs[t];
        }
        per[t].reserve(100000);
        while (true) {
          auto t0 = std::chrono::steady_clock::now();
          if (t0 >= t_end) break;
          bool ok = c.call(nullptr);
          auto t1 = std::chrono::steady_clock::now();
          if (t1 > t_end) break;  // answered after the window: neither counted nor timed
          if (ok) per[t].push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
          else ++errs[t];
        }
      });
    }
    while (warmed.load() < static_cast<long>(callers.size())) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    t_start = std::chrono::steady_clock::now();
    t_end = t_start + std::chrono::microseconds(static_cast<long>(a.duration_s * 1e6));
    cpu_start = cpu_seconds();
    go.store(true, std::memory_order_release);
    for (auto& th : threads) th.join();
    elapsed = std::chrono::duration<double>(t_end - t_start).count();
    for (size_t t = 0; t < per.size(); ++t) {
      lat.insert(lat.end(), per[t].begin(), per[t].end());
      errors += errs[t];
    }
    calls = static_cast<long>(lat.size()) + errors;
  }
  double cpu_us = calls ? (cpu_seconds() - cpu_start) * 1e6 / static_cast<double>(calls) : 0.0;

  std::printf("{\"api\": \"%s\", \"target\": \"%s\", \"concurrency\": %ld, \"channels\": %zu, "
              "\"requests\": %ld, \"errors\": %ld, \"latency_ms\": {",
              a.api.c_str(), a.target.c_str(), a.concurrency, channels.size(), calls, errors);
  if (!lat.empty()) {
    std::vector<double> s = lat;
    std::sort(s.begin(), s.end());
    double sum = 0;
    for (double v : s) sum += v;
    std::printf("\"p50\": %.4f, \"p90\": %.4f, \"p99\": %.4f, \"mean\": %.4f, \"max\": %.4f", pct(s, 50),
                pct(s, 90), pct(s, 99), sum / s.size(), s.back());
  }
  std::printf("}, \"throughput_rps\": %.1f, \"client_cpu_us_per_call\": %.1f}\n",
              static_cast<double>(lat.size()) / elapsed, cpu_us);
  return 0;
}
