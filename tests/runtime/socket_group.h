// A tensor-parallel group of `n` ranks joined over TCP on 127.0.0.1 (a free port), as processes
// join (socket_comm.h), for tests that then run each rank on a thread of their own.
#pragma once

#include <memory>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/comm.h"
#include "runtime/socket_comm.h"

namespace qilin {

// comms[r] is rank r's communicator; empty (with a test failure) when joining failed.
inline std::vector<std::unique_ptr<Communicator>> SocketGroup(int n) {
  std::vector<std::unique_ptr<Communicator>> comms(n);
  auto listener = SocketCommListener::Listen({"127.0.0.1", 0});
  EXPECT_TRUE(listener.ok()) << listener.status().ToString();
  if (!listener.ok()) return {};
  const int port = (*listener)->port();
  std::vector<std::thread> joins;
  for (int r = 1; r < n; ++r) {
    joins.emplace_back([&, r] {
      auto c = ConnectSocketComm({"127.0.0.1", port}, r, n, 10);
      EXPECT_TRUE(c.ok()) << c.status().ToString();
      if (c.ok()) comms[r] = std::move(*c);
    });
  }
  auto c = (*listener)->Accept(n, 10);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  if (c.ok()) comms[0] = std::move(*c);
  for (auto& t : joins) t.join();
  for (const auto& comm : comms) {
    if (!comm) return {};
  }
  return comms;
}

}  // namespace qilin
