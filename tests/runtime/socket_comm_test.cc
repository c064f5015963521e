// The TCP communicator's joining and failures (its collectives run through every case of
// tp_comm_test.cc): addresses, refusals of a wrong world size / rank / duplicate, time limits
// that name what is missing, and a rank that goes away mid-collective failing the others
// instead of hanging them.
#include <chrono>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/socket_comm.h"

namespace qilin {
namespace {

using Clock = std::chrono::steady_clock;

TEST(SocketCommTest, ParsesHostPortAndNamesTheFlagOnError) {
  auto a = ParseSocketAddress("10.0.0.7:29531", "--tp-master");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->host, "10.0.0.7");
  EXPECT_EQ(a->port, 29531);
  for (const char* bad : {"", "host", ":80", "host:", "host:99999", "host:8x", "host:123456"}) {
    auto r = ParseSocketAddress(bad, "--tp-master");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("--tp-master"), std::string::npos) << r.status().message();
  }
}

TEST(SocketCommTest, WrongWorldSizeRankAndDuplicatesAreRefusedAndTheRightRanksStillJoin) {
  auto listener = SocketCommListener::Listen({"127.0.0.1", 0});
  ASSERT_TRUE(listener.ok()) << listener.status().ToString();
  const SocketAddress at{"127.0.0.1", (*listener)->port()};
  Status wrong_size, wrong_rank, duplicate;
  std::unique_ptr<Communicator> one, two;
  std::thread joins([&] {
    wrong_size = ConnectSocketComm(at, 1, 4, 10).status();
    auto r1 = ConnectSocketComm(at, 1, 3, 10);
    ASSERT_TRUE(r1.ok()) << r1.status().ToString();
    one = std::move(*r1);
    duplicate = ConnectSocketComm(at, 1, 3, 10).status();
    auto r2 = ConnectSocketComm(at, 2, 3, 10);
    ASSERT_TRUE(r2.ok()) << r2.status().ToString();
    two = std::move(*r2);
  });
  auto zero = (*listener)->Accept(3, 20);
  joins.join();
  ASSERT_TRUE(zero.ok()) << zero.status().ToString();
  EXPECT_EQ(wrong_size.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_size.message().find("world size 4 differs from rank 0's 3"), std::string::npos)
      << wrong_size.message();
  EXPECT_EQ(duplicate.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(duplicate.message().find("rank 1 has already joined"), std::string::npos)
      << duplicate.message();
  // A rank outside the group is refused before it connects.
  wrong_rank = ConnectSocketComm(at, 3, 3, 1).status();
  EXPECT_EQ(wrong_rank.code(), StatusCode::kInvalidArgument);
  // The three joined ranks work.
  std::vector<float> v0(3, 1.0f), v1(3, 2.0f), v2(3, 4.0f);
  std::thread t1([&] { EXPECT_TRUE(one->AllReduceSum(v1.data(), 3).ok()); });
  std::thread t2([&] { EXPECT_TRUE(two->AllReduceSum(v2.data(), 3).ok()); });
  EXPECT_TRUE((*zero)->AllReduceSum(v0.data(), 3).ok());
  t1.join();
  t2.join();
  EXPECT_EQ(v0, std::vector<float>(3, 7.0f));
  EXPECT_EQ(v1, v0);
  EXPECT_EQ(v2, v0);
}

TEST(SocketCommTest, TimeLimitsNameTheAddressAndTheMissingRanks) {
  // Nobody listens on this port once the listener is gone.
  int port = 0;
  {
    auto l = SocketCommListener::Listen({"127.0.0.1", 0});
    ASSERT_TRUE(l.ok());
    port = (*l)->port();
  }
  const auto t0 = Clock::now();
  auto c = ConnectSocketComm({"127.0.0.1", port}, 1, 2, 0.5);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 5.0);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(c.status().message().find("127.0.0.1:" + std::to_string(port)), std::string::npos)
      << c.status().message();

  auto l = SocketCommListener::Listen({"127.0.0.1", 0});
  ASSERT_TRUE(l.ok());
  std::unique_ptr<Communicator> two;
  std::thread join([&] {
    auto r = ConnectSocketComm({"127.0.0.1", (*l)->port()}, 2, 4, 10);
    if (r.ok()) two = std::move(*r);
  });
  auto a = (*l)->Accept(4, 0.5);
  join.join();
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(a.status().message().find("ranks 1, 3 of 4 did not join"), std::string::npos)
      << a.status().message();

  // The wait's check (a spawned rank that exited) ends it at once with its error.
  auto l2 = SocketCommListener::Listen({"127.0.0.1", 0});
  ASSERT_TRUE(l2.ok());
  const auto t1 = Clock::now();
  auto b = (*l2)->Accept(2, 30, 600, [] { return Unavailable("rank 1 exited with status 3"); });
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t1).count(), 5.0);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().message(), "rank 1 exited with status 3");
}

TEST(SocketCommTest, APortInUseIsAClearError) {
  auto l = SocketCommListener::Listen({"127.0.0.1", 0});
  ASSERT_TRUE(l.ok());
  auto again = SocketCommListener::Listen({"127.0.0.1", (*l)->port()});
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(again.status().message().find("--tp-master"), std::string::npos)
      << again.status().message();
}

// A rank whose process dies (its connection closes) fails rank 0's collective and, through
// rank 0, every other rank's: nobody waits forever.
TEST(SocketCommTest, ARankThatGoesAwayFailsTheOthersInsteadOfHangingThem) {
  auto l = SocketCommListener::Listen({"127.0.0.1", 0});
  ASSERT_TRUE(l.ok());
  std::unique_ptr<Communicator> one, two;
  std::thread joins([&] {
    one = std::move(ConnectSocketComm({"127.0.0.1", (*l)->port()}, 1, 3, 10).value());
    two = std::move(ConnectSocketComm({"127.0.0.1", (*l)->port()}, 2, 3, 10).value());
  });
  auto zero = (*l)->Accept(3, 10);
  joins.join();
  ASSERT_TRUE(zero.ok());
  Status s0, s1;
  std::thread t0([&] {
    std::vector<float> v(8, 1.0f);
    s0 = (*zero)->AllReduceSum(v.data(), 8);
  });
  std::thread t1([&] {
    std::vector<float> v(8, 1.0f);
    s1 = one->AllReduceSum(v.data(), 8);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  two.reset();  // rank 2 exits without a word
  t0.join();
  t1.join();
  EXPECT_EQ(s0.code(), StatusCode::kCancelled) << s0.ToString();
  EXPECT_NE(s0.message().find("rank 2 closed the connection"), std::string::npos) << s0.message();
  EXPECT_EQ(s1.code(), StatusCode::kCancelled) << s1.ToString();
  EXPECT_NE(s1.message().find("rank 2 closed the connection"), std::string::npos) << s1.message();
  // And every later call fails at once.
  float x = 0;
  EXPECT_EQ((*zero)->Barrier().code(), StatusCode::kCancelled);
  EXPECT_EQ(one->AllReduceSum(&x, 1).code(), StatusCode::kCancelled);
}

}  // namespace
}  // namespace qilin
